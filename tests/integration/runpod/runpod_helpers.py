"""Helpers for the RunPod integration tests: settings that point a server at the simulator,
and a comic job driven the way a generation service drives one (analysis, panels on RunPod,
post-processing, completion) with a WebSocket watcher recording every state it receives."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from tests.support.clients import WSWatcher
from tests.support.process import ServerProcess

from phasecast.simulators.runpod import RunPodSimulator

TERMINAL = ("COMPLETE", "FAILED", "CANCELLED")


def runpod_env(sim: RunPodSimulator, **extra: str) -> dict[str, str]:
    """Settings that point a server at the simulator, with short poll intervals."""
    return {
        "PHASECAST_RUNPOD_ENDPOINT": sim.endpoint,
        "PHASECAST_RUNPOD_API_KEY": sim.api_key,
        "PHASECAST_RUNPOD_BASE_URL": sim.base_url,
        "PHASECAST_RUNPOD_POLL_INTERVAL": "0.1",
        "PHASECAST_RUNPOD_QUEUE_POLL_INTERVAL": "0.2",
        "PHASECAST_RUNPOD_MAX_POLL_INTERVAL": "1",
        "PHASECAST_RUNPOD_LEASE_SECONDS": "1.5",
        "PHASECAST_RUNPOD_REQUEST_TIMEOUT": "2",
        "PHASECAST_PING_INTERVAL": "1",
        **extra,
    }


def panel_inputs(count: int, special: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    panels = []
    for number in range(1, count + 1):
        body: dict[str, Any] = {"prompt": f"panel {number}: a lighthouse at dusk", "seed": number}
        if special and number in special:
            body["sim"] = special[number]
        panels.append({"step": f"panel-{number}", "input": body})
    return panels


@dataclass
class Comic:
    """One comic job, driven through a server, watched over a WebSocket."""

    server: ServerProcess
    worker_token: str
    viewer_token: str
    job_id: str
    watcher: WSWatcher | None = None
    api: httpx.AsyncClient = field(init=False)

    async def start(self, panels: list[dict[str, Any]], **policy: Any) -> dict[str, Any]:
        self.api = httpx.AsyncClient(base_url=self.server.url, timeout=10,
                                     headers={"Authorization": f"Bearer {self.worker_token}"})
        reply = await self.api.post("/v1/jobs", json={"job_id": self.job_id, "owner": "alice"})
        assert reply.status_code == 201, reply.text
        await self.watch()
        await self.progress({"phase": "ANALYZING", "phase_progress": 100, "message": "Story analysed"})
        reply = await self.api.post(f"/v1/integrations/runpod/jobs/{self.job_id}/panels",
                                    json={"panels": panels, **policy})
        assert reply.status_code == 202, reply.text
        body: dict[str, Any] = reply.json()
        return body

    async def start_watching_only(self) -> None:
        """For a job another client started: an API client and a watcher, nothing else."""
        self.api = httpx.AsyncClient(base_url=self.server.url, timeout=10,
                                     headers={"Authorization": f"Bearer {self.worker_token}"})
        await self.watch()

    async def watch(self, since: int | None = None) -> WSWatcher:
        self.watcher = await WSWatcher(self.server.url, self.viewer_token).connect()
        await self.watcher.subscribe(self.job_id, since=since)
        return self.watcher

    async def progress(self, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.api.post(f"/v1/jobs/{self.job_id}/progress", json=body)
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    async def wait_phase(self, phases: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
        assert self.watcher is not None
        job = self.job_id
        await self.watcher.wait_for(
            lambda w: bool(w.states.get(job)) and w.states[job][-1].state["phase"] in phases, timeout
        )
        return self.watcher.states[job][-1].state

    async def wait_generated(self, timeout: float = 30) -> dict[str, Any]:
        return await self.wait_phase(("POST_PROCESSING", *TERMINAL), timeout)

    async def finish(self) -> dict[str, Any]:
        """Post-processing by the generation service, then completion."""
        await self.progress({"phase": "POST_PROCESSING", "phase_progress": 50, "message": "Lettering"})
        await self.progress({"phase": "POST_PROCESSING", "phase_progress": 100, "message": "Packaging"})
        reply = await self.api.post(f"/v1/jobs/{self.job_id}/complete", json={"message": "Ready"})
        assert reply.status_code == 200, reply.text
        assert self.watcher is not None
        return (await self.watcher.wait_terminal(self.job_id)).state

    def states(self) -> list[dict[str, Any]]:
        assert self.watcher is not None
        return [r.state for r in self.watcher.states.get(self.job_id, [])]

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.close()
        await self.api.aclose()


def assert_never_backwards(states: list[dict[str, Any]]) -> None:
    seqs = [s["seq"] for s in states]
    assert seqs == sorted(set(seqs)), f"seq not strictly increasing: {seqs}"
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress), f"overall progress went backwards: {progress}"
    for before, after in itertools.pairwise(states):
        if before["phase"] == after["phase"] == "GENERATING":
            assert after["phase_progress"] >= before["phase_progress"]
            for step, info in before["steps"].items():
                assert after["steps"][step]["progress"] >= info["progress"], (step, before, after)
                if info["status"] == "done":
                    assert after["steps"][step]["status"] == "done"


def panel_progress_seen(states: list[dict[str, Any]]) -> dict[str, set[float]]:
    """Intermediate progress values (strictly between 0 and 100) each panel showed."""
    seen: dict[str, set[float]] = {}
    for state in states:
        if state["phase"] != "GENERATING":
            continue
        for step, info in state["steps"].items():
            if 0 < info["progress"] < 100:
                seen.setdefault(step, set()).add(info["progress"])
    return seen


def done_transitions(states: list[dict[str, Any]]) -> dict[str, int]:
    """How many times each panel went from not done to done (must be exactly once)."""
    counts: dict[str, int] = {}
    previous: dict[str, str] = {}
    for state in states:
        if state["phase"] != "GENERATING":
            continue
        for step, info in state["steps"].items():
            if info["status"] == "done" and previous.get(step) != "done":
                counts[step] = counts.get(step, 0) + 1
            previous[step] = info["status"]
    return counts


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition of something we cannot await (the simulator's records) until a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)


async def eventually_async(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """``eventually`` for a condition read over the network (the server's records)."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.05)


def slow_panels(count: int, steps: int = 400) -> dict[int, dict[str, Any]]:
    """Panels that stay IN_PROGRESS long enough to act on them mid-generation."""
    return {number: {"steps": steps} for number in range(1, count + 1)}
