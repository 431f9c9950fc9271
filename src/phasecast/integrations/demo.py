"""The demo's comics drawn on the local RunPod simulator, so ``phasecast demo`` shows
per-panel progress exactly as a real RunPod integration produces it (queueing, progress
outputs picked up by the poller, completion webhooks, a failed panel being retried)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from phasecast.config import Settings
from phasecast.errors import JobTerminal
from phasecast.integrations.pipeline import PanelSpec, RunPodPanels
from phasecast.integrations.settings import RunPodSettings
from phasecast.integrations.store import FailurePolicy
from phasecast.model import Phase
from phasecast.server.deps import Services
from phasecast.tracker import ProgressTracker
from phasecast.worker import error_of


def demo_runpod_startup(
    settings: Settings, runpod: RunPodSettings | None = None, *, speed: float = 1.0
) -> Callable[[FastAPI, Services], Awaitable[Callable[[], Awaitable[None]]]]:
    """Start a RunPod simulator in this process and the RunPod integration pointed at it."""

    async def start(app: FastAPI, services: Services) -> Callable[[], Awaitable[None]]:
        from phasecast.integrations import runpod_startup
        from phasecast.simulators.runpod import RunPodSimulator

        sim = await asyncio.to_thread(
            RunPodSimulator(queue_delay=0.8 / speed, step_delay=0.5 / speed, steps=8).start
        )
        derived = dataclasses.replace(
            runpod or RunPodSettings(), endpoint=sim.endpoint, api_key=sim.api_key,
            base_url=sim.base_url,
            # Poll in step with the simulation, so every panel shows progress between polls.
            poll_interval=max(0.05, 0.3 / speed),
            queue_poll_interval=max(0.1, 0.6 / speed),
        )
        stop_runpod = await runpod_startup(settings, derived)(app, services)
        app.state.runpod_simulator = sim

        async def stop() -> None:
            if stop_runpod is not None:
                await stop_runpod()
            await asyncio.to_thread(sim.stop)

        return stop

    return start


async def simulate_comic_on_runpod(
    tracker: ProgressTracker,
    runpod: RunPodPanels,
    job_id: str,
    *,
    panels: int = 6,
    speed: float = 1.0,
    fail: bool = False,
    rng: random.Random | None = None,
) -> None:
    """One demo comic: analysis in-process, panels on (simulated) RunPod, post-processing.
    Picks up where the job stands: after a restart, panels already submitted are left to the
    poller, which resumes them from the stored in-flight records."""
    rng = rng or random.Random()

    async def pause(seconds: float) -> None:
        await asyncio.sleep(seconds * rng.uniform(0.7, 1.3) / speed)

    try:
        start = await tracker.get(job_id)
        if start.terminal:
            return
        if start.phase.rank < Phase.GENERATING.rank:
            for percent, text in ((20, "Reading the story"), (60, "Finding the characters"),
                                  (100, "Story analysed")):
                await tracker.report(job_id, Phase.ANALYZING, percent, text)
                await pause(1.0)
            specs = []
            for number in range(1, panels + 1):
                body: dict[str, object] = {"prompt": f"panel {number}", "seed": rng.randrange(1 << 30)}
                if fail and number == max(1, panels // 2):
                    body["sim"] = {"fail_runs": 1}  # fails once; the retry policy redraws it
                specs.append(PanelSpec(f"panel-{number}", body))
            await runpod.submit(job_id, specs, FailurePolicy(on_failure="retry", max_retries=1))
        async with tracker.watch(job_id) as states:
            async for state in states:
                if state.terminal:
                    return
                if state.phase is Phase.POST_PROCESSING:
                    break
        for percent, text in ((30, "Lettering"), (70, "Assembling pages"), (100, "Packaging")):
            await tracker.report(job_id, Phase.POST_PROCESSING, percent, text)
            await pause(1.2)
        await tracker.complete(job_id, "Your comic is ready")
    except JobTerminal:
        return
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        with contextlib.suppress(JobTerminal):
            await tracker.fail(job_id, "generation_failed", error_of(exc)[1])
