"""``phasecast demo``: a server plus simulated comic generations to watch in a browser.

The simulation reports progress through the same ``ProgressTracker`` calls a real
generation backend makes: story analysis, one step per panel (a few panels drawn at once, as
GPU workers would), post-processing, completion.
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

from phasecast.errors import JobTerminal
from phasecast.integrations.demo import simulate_comic_on_runpod
from phasecast.integrations.pipeline import RunPodPanels
from phasecast.model import Phase
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


async def simulate_comic(
    tracker: ProgressTracker,
    job_id: str,
    *,
    panels: int = 6,
    speed: float = 1.0,
    fail: bool = False,
    rng: random.Random | None = None,
) -> None:
    """Drive one job through every phase, about 30 s at speed 1. Picks up where the job
    stands, so a restarted demo server finishes the generations it had started."""
    rng = rng or random.Random()

    async def pause(seconds: float) -> None:
        await asyncio.sleep(seconds * rng.uniform(0.7, 1.3) / speed)

    try:
        start = await tracker.get(job_id)
        if start.terminal:
            return
        if start.phase.rank < Phase.GENERATING.rank:
            await pause(1.5)
            for percent, text in ((20, "Reading the story"), (55, "Finding the characters"),
                                  (85, "Planning the panels"), (100, "Story analysed")):
                await tracker.report(job_id, Phase.ANALYZING, percent, text)
                await pause(1.0)
        if start.phase.rank <= Phase.GENERATING.rank:
            await tracker.report(job_id, Phase.GENERATING, message=f"Drawing {panels} panels")
            drawn = start.steps if start.phase is Phase.GENERATING else {}
            gpus = asyncio.Semaphore(3)

            async def draw(number: int) -> None:
                step = f"panel-{number}"
                reached = float(drawn.get(step, {}).get("progress", 0.0))
                if reached >= 100:
                    return
                async with gpus:
                    for percent in range(int(reached // 20) * 20, 101, 20):
                        await tracker.step(
                            job_id, Phase.GENERATING, step, float(percent),
                            steps_total=panels, message=f"Drawing panel {number} of {panels}",
                        )
                        await pause(0.7)
                    if fail and number == max(1, panels // 2):
                        raise RuntimeError(f"panel {number}: the GPU worker ran out of memory")

            await asyncio.gather(*(draw(n) for n in range(1, panels + 1)))
        for percent, text in ((30, "Lettering"), (70, "Assembling pages"), (100, "Packaging")):
            await tracker.report(job_id, Phase.POST_PROCESSING, percent, text)
            await pause(1.2)
        await tracker.complete(job_id, "Your comic is ready")
    except JobTerminal:
        log.info("demo job ended elsewhere (cancelled)", extra={"job_id": job_id})
    except RuntimeError as exc:
        with contextlib.suppress(JobTerminal):
            await tracker.fail(job_id, "generation_failed", str(exc))


class StartGeneration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    panels: int = Field(6, ge=1, le=24)
    title: str | None = Field(None, max_length=80)


class DemoRunner:
    def __init__(
        self, tracker: ProgressTracker, options: DemoOptions, runpod: RunPodPanels | None = None
    ) -> None:
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
        if self.runpod is not None:
            return simulate_comic_on_runpod(self.tracker, self.runpod, job_id, panels=panels,
                                            speed=self.options.speed, fail=fail, rng=self.rng)
        return simulate_comic(self.tracker, job_id, panels=panels, speed=self.options.speed,
                              fail=fail, rng=self.rng)

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
        # The RunPod integration's startup hook runs first and leaves its pipeline here; with
        # it, panels are drawn on the (simulated) RunPod as a real deployment would.
        runner = DemoRunner(services.tracker, options, getattr(app.state, "runpod", None))
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
