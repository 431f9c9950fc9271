"""Integrations with generation backends, attached to the server as startup hooks. Each reads
its own settings (``integrations.settings``); the core server settings know none of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from phasecast.config import Settings
from phasecast.integrations.settings import RunPodSettings
from phasecast.server.app import Startup
from phasecast.server.deps import Services


def startup_hooks(settings: Settings, *, demo_speed: float | None = None) -> list[Startup]:
    """The hooks that the configured integrations need: RunPod when an endpoint is set; in
    the demo (``demo_speed`` given) without one, RunPod is the local simulator
    (``app.state.runpod`` either way). Raises ``ConfigurationError`` for bad settings."""
    runpod = RunPodSettings.from_env()
    if runpod.configured:
        return [runpod_startup(settings, runpod)]
    if demo_speed is not None:
        from phasecast.integrations.demo import demo_runpod_startup

        return [demo_runpod_startup(settings, runpod, speed=demo_speed)]
    return []


def runpod_startup(settings: Settings, runpod_settings: RunPodSettings) -> Startup:
    runpod_settings.check()

    async def start(app: FastAPI, services: Services) -> Callable[[], Awaitable[None]]:
        import uuid

        from phasecast import __version__
        from phasecast.integrations.pipeline import RunPodConfig, RunPodPanels
        from phasecast.integrations.routes import router
        from phasecast.integrations.runpod import RunPodClient
        from phasecast.integrations.store import open_store

        config = RunPodConfig.from_settings(settings, runpod_settings)
        instance = uuid.uuid4().hex[:12]
        client = RunPodClient(runpod_settings.base_url, runpod_settings.endpoint or "",
                              runpod_settings.api_key or "", timeout=config.request_timeout,
                              user_agent=f"phasecast/{__version__} instance/{instance}")
        runpod = RunPodPanels(services.tracker, client, open_store(services.tracker.engine), config,
                              instance_id=instance)
        app.state.runpod = runpod
        app.include_router(router)
        await runpod.start()
        return runpod.stop

    return start


__all__ = ["RunPodSettings", "runpod_startup", "startup_hooks"]
