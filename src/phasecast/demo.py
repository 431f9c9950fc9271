"""``phasecast demo``: a server plus simulated comic generations to watch in a browser.

Each generation goes the way a real one does: story analysis reported through the
``ProgressTracker``, one panel per RunPod job on the local RunPod simulator (queueing,
progress picked up by the poller, completion webhooks), then post-processing
(``phasecast.integrations.demo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from phasecast.errors import ConfigurationError
from phasecast.integrations.demo import simulate_comic_on_runpod
from phasecast.integrations.pipeline import RunPodPanels
from phasecast.server.auth import SCOPE_READ, mint_token
from phasecast.server.deps import Services
from phasecast.tracker import ProgressTracker

log = logging.getLogger("phasecast.demo")

DEMO_OWNER = "demo"
TITLES = (
    "The Lighthouse Keeper", "Robot Gardener", "Moon Bakery", "The Last Train",
    "Cat Detective", "Cloud Harbour", "Dragon Postman", "Night Market",
)


@dataclass(slots=True)
class DemoOptions:
    speed: float = 1.0
    auto_jobs: bool = True
    every_seconds: float = 12.0
    max_active: int = 3
    panels: int = 6
    failure_rate: float = 0.0


class StartGeneration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    panels: int = Field(6, ge=1, le=24)
    title: str | None = Field(None, max_length=80)


class DemoRunner:
    def __init__(self, tracker: ProgressTracker, options: DemoOptions, runpod: RunPodPanels) -> None:
        self.tracker = tracker
        self.options = options
        self.runpod = runpod
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random()

    async def start_generation(self, panels: int | None = None, title: str | None = None) -> str:
        state = await self.tracker.create(
            "comic",
            owner=DEMO_OWNER,
            metadata={"title": title or self.rng.choice(TITLES), "panels": panels or self.options.panels},
        )
        fail = self.rng.random() < self.options.failure_rate
        self._run(self._generation(state.job_id, panels or self.options.panels, fail))
        return state.job_id

    def resume(self, job_id: str, panels: int) -> None:
        self._run(self._generation(job_id, panels, fail=False))

    def _generation(self, job_id: str, panels: int, fail: bool) -> Coroutine[Any, Any, None]:
        return simulate_comic_on_runpod(self.tracker, self.runpod, job_id, panels=panels,
                                        speed=self.options.speed, fail=fail, rng=self.rng)

    def _run(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def auto_loop(self) -> None:
        while True:
            if len(self.tasks) < self.options.max_active:
                await self.start_generation()
            await asyncio.sleep(self.options.every_seconds / self.options.speed)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def demo_startup(
    options: DemoOptions,
) -> Callable[[FastAPI, Services], Awaitable[Callable[[], Awaitable[None]] | None]]:
    """An app startup hook that adds the demo routes and the simulated workload."""

    async def start(app: FastAPI, services: Services) -> Callable[[], Awaitable[None]]:
        # The RunPod integration's startup hook runs first and leaves its pipeline here.
        runpod: RunPodPanels | None = getattr(app.state, "runpod", None)
        if runpod is None:
            raise ConfigurationError(
                "the demo draws its panels on RunPod: install the RunPod startup hook "
                "(real, or phasecast.integrations.demo.demo_runpod_startup) before the demo's"
            )
        runner = DemoRunner(services.tracker, options, runpod)
        router = APIRouter(prefix="/v1/demo", tags=["demo"])

        @router.get("/config")
        async def config() -> dict[str, Any]:
            token = mint_token(services.settings, DEMO_OWNER, [SCOPE_READ], ttl_seconds=12 * 3600)
            return {"token": token, "engine": services.settings.engine.split(":", 1)[0]}

        @router.post("/generations", status_code=201)
        async def start_generation(body: StartGeneration, request: Request) -> JSONResponse:
            job_id = await runner.start_generation(body.panels, body.title)
            return JSONResponse({"job_id": job_id}, 201)

        app.include_router(router)
        # Generations a previous run of the demo left unfinished (killed server) go on.
        for state in await services.tracker.list(DEMO_OWNER, active_only=True, limit=50):
            runner.resume(state.job_id, int(state.metadata.get("panels", options.panels)))
        loop_task = asyncio.create_task(runner.auto_loop()) if options.auto_jobs else None

        async def stop() -> None:
            if loop_task is not None:
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
            await runner.stop()

        return stop

    return start
