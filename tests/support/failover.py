"""What the failover tests share (a cluster primary killed, a slot moved, a Sentinel
failover): a writer that retries through 503s and records every acknowledged state, watchers
on every instance, and the check that nothing acknowledged was lost or reordered and every
watcher ended with the terminal state."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tests.support.clients import WSWatcher
from tests.support.process import ServerProcess


@contextlib.contextmanager
def instances(engine_url: str, tmp_path: Path, count: int = 2) -> Iterator[list[ServerProcess]]:
    """``count`` server processes on one engine (pinging watchers every second), each
    logging to its own file in ``tmp_path``, stopped however the test ends."""
    servers = [
        ServerProcess(engine_url, env={"PHASECAST_PING_INTERVAL": "1"},
                      log_path=tmp_path / f"server-{i}.log")
        for i in range(count)
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


class Writer:
    """Reports through one instance, retrying through 503s and dropped connections;
    records every acknowledged state per job."""

    def __init__(self, api: httpx.AsyncClient) -> None:
        self.api = api
        self.acked: dict[str, list[dict[str, Any]]] = {}
        self.refused = 0

    async def post(self, path: str, body: dict[str, Any], job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = await self.api.post(path, json=body)
            except httpx.TransportError:
                reply = None
            if reply is not None and reply.status_code not in (502, 503, 504):
                assert reply.status_code in (200, 201), reply.text
                state: dict[str, Any] = reply.json()["state"] if "state" in reply.json() else reply.json()
                self.acked.setdefault(job_id, []).append(state)
                return state
            self.refused += 1
            assert time.monotonic() < deadline, f"writes to {job_id} never resumed"
            await asyncio.sleep(0.02)

    async def create(self, job_id: str) -> None:
        reply = await self.api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})
        assert reply.status_code == 201, reply.text
        self.acked[job_id] = [reply.json()]

    async def run_job(self, job_id: str, reports: int, pause: float) -> None:
        for index in range(1, reports + 1):
            progress = round(100 * index / (reports + 1), 2)
            await self.post(f"/v1/jobs/{job_id}/progress",
                            {"phase": "ANALYZING", "phase_progress": progress}, job_id)
            await asyncio.sleep(pause)
        await self.post(f"/v1/jobs/{job_id}/complete", {}, job_id)


async def watch_all(servers: list[ServerProcess], token: str, jobs: list[str]) -> list[WSWatcher]:
    watchers = []
    for server in servers:
        watcher = await WSWatcher(server.url, token).connect()
        for job_id in jobs:
            await watcher.subscribe(job_id)
        watchers.append(watcher)
    for watcher in watchers:
        for job_id in jobs:
            await watcher.wait_seq(job_id, 1)
    return watchers


@dataclass
class UnderWay:
    """Jobs reporting in the background while a failover test breaks something."""

    api: httpx.AsyncClient  # the writer's client, on the instance the jobs report through
    writer: Writer
    watchers: list[WSWatcher]  # one per instance, each subscribed to every job
    running: asyncio.Future[list[None]]  # every job's reports; awaited by the test


@contextlib.asynccontextmanager
async def jobs_under_way(
    servers: list[ServerProcess], worker_token: str, watcher_token: str, jobs: list[str], *,
    until: str, via: int = 0, pause: float = 0.03, reports: int = 60,
) -> AsyncIterator[UnderWay]:
    """The opening every failover test shares: ``jobs`` created through ``servers[via]``, a
    watcher on every instance, each job sending ``reports`` reports ``pause`` seconds apart in
    the background, and ``until`` seen at seq 10 by the watcher on ``servers[via]``, so what the
    test breaks next breaks mid-job. On the way out the reports still running are cancelled
    (a test that failed early) and the watchers closed."""
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=servers[via].url, headers=headers, timeout=10) as api:
        writer = Writer(api)
        for job_id in jobs:
            await writer.create(job_id)
        watchers = await watch_all(servers, watcher_token, jobs)
        running = asyncio.gather(*(writer.run_job(j, reports, pause) for j in jobs))
        try:
            await watchers[via].wait_seq(until, 10)
            yield UnderWay(api, writer, watchers, running)
        finally:
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
            for watcher in watchers:
                await watcher.close()


async def check_outcome(
    watchers: list[WSWatcher], writer: Writer, api: httpx.AsyncClient, jobs: list[str]
) -> None:
    for job_id in jobs:
        acked = writer.acked[job_id]
        seqs = [s["seq"] for s in acked]
        # Acknowledged updates: each one a new seq, in order, none overwritten later.
        assert seqs == sorted(set(seqs)), f"{job_id}: acknowledged seqs {seqs}"
        stored = (await api.get(f"/v1/jobs/{job_id}")).json()
        assert stored == acked[-1], f"{job_id}: the stored state is not the last acknowledged one"
        history = (await api.get(f"/v1/jobs/{job_id}/history", params={"limit": 1000})).json()
        entries = history["events"]
        by_seq = {e["seq"]: e for e in entries}
        for state in acked:
            kept = by_seq.get(state["seq"])
            assert kept is not None and kept["progress"] == state["progress"], (
                f"{job_id}: acknowledged seq {state['seq']} lost or rewritten"
            )
        for watcher in watchers:
            last = await watcher.wait_terminal(job_id, timeout=30)
            assert last.state == stored
            seen = watcher.seqs(job_id)
            assert seen == sorted(set(seen)), f"{job_id}: a watcher saw {seen}"
            progress = [r.state["progress"] for r in watcher.states[job_id]]
            assert progress == sorted(progress)


def first_delivery_after(watchers: list[WSWatcher], jobs: list[str], moment: float) -> float:
    """Seconds from ``moment`` (Unix time) to the first state of ``jobs`` any watcher got."""
    times = [
        r.received_at for w in watchers for j in jobs for r in w.states.get(j, [])
        if r.received_at >= moment
    ]
    return min(times) - moment
