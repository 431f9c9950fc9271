"""Phasecast on a Redis Cluster (issue 10, section 1): watchers on two server instances see
every job on every shard; a primary killed mid-job (its replica is promoted) and a slot
migrated mid-job both end with every watcher holding the terminal state, with no
acknowledged update lost or reordered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.crc import key_slot
from tests.support.clients import WSWatcher
from tests.support.process import ServerProcess
from tests.support.redis_servers import RedisClusterProcesses

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TERMINAL = ("COMPLETE", "FAILED", "CANCELLED")


def ids_on_every_shard(cluster: RedisClusterProcesses, per_shard: int, prefix: str) -> list[str]:
    """Job ids chosen so that each primary owns ``per_shard`` of them."""
    shards = cluster.shards()
    wanted = {address: per_shard for address in shards}
    found: list[str] = []
    index = 0
    while any(wanted.values()):
        job_id = f"{prefix}-{index}"
        index += 1
        slot = key_slot(job_id.encode())
        owner = next(a for a, ranges in shards.items() if any(s <= slot <= e for s, e in ranges))
        if wanted[owner]:
            wanted[owner] -= 1
            found.append(job_id)
    return found


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


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterProcesses]:
    """A cluster for one test: these tests kill nodes and move slots."""
    with RedisClusterProcesses() as cluster:
        cluster.wait_replicas_synced()
        yield cluster


@pytest.fixture
async def two_instances(
    own_cluster: RedisClusterProcesses, tmp_path: Path
) -> AsyncIterator[list[ServerProcess]]:
    servers = [
        ServerProcess(own_cluster.url, env={"PHASECAST_PING_INTERVAL": "1"},
                      log_path=tmp_path / f"server-{i}.log")
        for i in range(2)
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


async def test_watchers_on_two_instances_see_every_job_on_every_shard(
    redis_cluster: RedisClusterProcesses, cluster_engine_url: str, tmp_path: Path,
    make_token: Callable[..., str], worker_token: str,
) -> None:
    url = cluster_engine_url  # a prefix of its own, its keys deleted from every primary afterwards
    jobs = ids_on_every_shard(redis_cluster, 4, "spread")
    with (
        ServerProcess(url, log_path=tmp_path / "a.log") as first,
        ServerProcess(url, log_path=tmp_path / "b.log") as second,
    ):
        headers = {"Authorization": f"Bearer {worker_token}"}
        async with (
            httpx.AsyncClient(base_url=first.url, headers=headers) as api_a,
            httpx.AsyncClient(base_url=second.url, headers=headers) as api_b,
        ):
            writers = [Writer(api_a), Writer(api_b)]
            for index, job_id in enumerate(jobs):
                await writers[index % 2].create(job_id)
            watchers = await watch_all([first, second], make_token("alice"), jobs)
            await asyncio.gather(*(
                writers[index % 2].run_job(job_id, 10, 0.005) for index, job_id in enumerate(jobs)
            ))
            for index, job_id in enumerate(jobs):
                await check_outcome(watchers, writers[index % 2], api_a, [job_id])
            # Listing is exact across shards, newest first.
            listed = (await api_a.get("/v1/jobs", params={"limit": 100},
                                      headers={"Authorization": f"Bearer {make_token('alice')}"})).json()
            rows = listed["jobs"]
            assert [r["job_id"] for r in rows] == list(reversed(jobs))
            for watcher in watchers:
                await watcher.close()


async def test_a_primary_killed_mid_job_fails_over_and_watchers_end_complete(
    own_cluster: RedisClusterProcesses, two_instances: list[ServerProcess],
    make_token: Callable[..., str], worker_token: str, capsys: pytest.CaptureFixture[str],
) -> None:
    jobs = ids_on_every_shard(own_cluster, 2, "fo")
    victim = own_cluster.owner_of(jobs[0])
    doomed = [j for j in jobs if own_cluster.owner_of(j) is victim]
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=two_instances[0].url, headers=headers, timeout=10) as api:
        writer = Writer(api)
        for job_id in jobs:
            await writer.create(job_id)
        watchers = await watch_all(two_instances, make_token("alice"), jobs)
        running = asyncio.gather(*(writer.run_job(j, 60, 0.03) for j in jobs))
        await watchers[0].wait_seq(doomed[0], 10)
        killed_at = time.time()
        victim.kill()
        await running
        await check_outcome(watchers, writer, api, jobs)
        promoted = own_cluster.owner_of(doomed[0])
        assert promoted is not victim and promoted.alive
        delay = first_delivery_after(watchers, doomed, killed_at + 0.0)
        with capsys.disabled():
            print(f"\nprimary killed: first live update of its jobs {delay * 1000:.0f} ms after the "
                  f"kill; {writer.refused} requests refused (503) during the election")
        for watcher in watchers:
            await watcher.close()


async def test_a_slot_migrated_mid_job_keeps_watchers_live(
    own_cluster: RedisClusterProcesses, two_instances: list[ServerProcess],
    make_token: Callable[..., str], worker_token: str, capsys: pytest.CaptureFixture[str],
) -> None:
    jobs = ids_on_every_shard(own_cluster, 1, "mv")
    moving = jobs[0]
    source = own_cluster.owner_of(moving)
    target = next(
        own_cluster.node_at(a) for a in own_cluster.shards() if own_cluster.node_at(a) is not source
    )
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=two_instances[1].url, headers=headers, timeout=10) as api:
        writer = Writer(api)
        for job_id in jobs:
            await writer.create(job_id)
        watchers = await watch_all(two_instances, make_token("alice"), jobs)
        running = asyncio.gather(*(writer.run_job(j, 60, 0.02) for j in jobs))
        await watchers[1].wait_seq(moving, 10)
        await asyncio.to_thread(own_cluster.migrate_slot, key_slot(moving.encode()), target)
        moved_at = time.time()
        assert own_cluster.owner_of(moving) is target
        await running
        await check_outcome(watchers, writer, api, jobs)
        delay = first_delivery_after(watchers, [moving], moved_at)
        with capsys.disabled():
            print(f"\nslot migrated: first update of the moved job {delay * 1000:.0f} ms after the "
                  f"move; {writer.refused} requests refused meanwhile")
        for watcher in watchers:
            await watcher.close()
