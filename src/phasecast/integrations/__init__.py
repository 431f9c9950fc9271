"""Integrations with generation backends, attached to the server as startup hooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from phasecast.config import Settings
from phasecast.errors import ConfigurationError
from phasecast.server.app import Startup
from phasecast.server.deps import Services


def startup_hooks(settings: Settings) -> list[Startup]:
    """The hooks that the configured integrations need: RunPod when an endpoint is set; in
    the demo without one, RunPod is the local simulator (``app.state.runpod`` either way)."""
    if settings.runpod_endpoint:
        return [runpod_startup(settings)]
    if settings.demo:
        from phasecast.integrations.demo import demo_runpod_startup

        return [demo_runpod_startup(settings)]
    return []


def runpod_startup(settings: Settings) -> Startup:
    if not settings.runpod_api_key:
        raise ConfigurationError(
            "PHASECAST_RUNPOD_ENDPOINT is set but PHASECAST_RUNPOD_API_KEY is not; set both"
        )

    async def start(app: FastAPI, services: Services) -> Callable[[], Awaitable[None]]:
        import uuid

        from phasecast import __version__
        from phasecast.integrations.pipeline import RunPodConfig, RunPodPanels
        from phasecast.integrations.routes import router
        from phasecast.integrations.runpod import RunPodClient
        from phasecast.integrations.store import open_store

        config = RunPodConfig.from_settings(settings)
        instance = uuid.uuid4().hex[:12]
        client = RunPodClient(settings.runpod_base_url, settings.runpod_endpoint or "",
                              settings.runpod_api_key or "", timeout=config.request_timeout,
                              user_agent=f"phasecast/{__version__} instance/{instance}")
        runpod = RunPodPanels(services.tracker, client, open_store(services.tracker.engine), config,
                              instance_id=instance)
        app.state.runpod = runpod
        app.include_router(router)
        await runpod.start()
        return runpod.stop

    return start
