"""Phasecast on a Redis Cluster (issue 10, section 1): watchers on two server instances see
every job on every shard; a primary killed mid-job (its replica is promoted) and a slot
migrated mid-job both end with every watcher holding the terminal state, with no
acknowledged update lost or reordered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis.crc import key_slot
from tests.support.failover import (
    Writer,
    check_outcome,
    first_delivery_after,
    instances,
    jobs_under_way,
    watch_all,
)
from tests.support.process import ServerProcess
from tests.support.redis_servers import RedisClusterProcesses

from phasecast.engines import open_engine
from phasecast.errors import EngineUnavailable

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
    with instances(own_cluster.url, tmp_path) as servers:
        yield servers


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
    async with jobs_under_way(two_instances, worker_token, make_token("alice"), jobs, until=doomed[0]) as run:
        writer, watchers = run.writer, run.watchers
        killed_at = time.time()
        victim.kill()
        await run.running
        await check_outcome(watchers, writer, run.api, jobs)
        promoted = own_cluster.owner_of(doomed[0])
        assert promoted is not victim and promoted.alive
        delay = first_delivery_after(watchers, doomed, killed_at + 0.0)
        with capsys.disabled():
            print(f"\nprimary killed: first live update of its jobs {delay * 1000:.0f} ms after the "
                  f"kill; {writer.refused} requests refused (503) during the election")


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
    async with jobs_under_way(two_instances, worker_token, make_token("alice"), jobs,
                              until=moving, via=1, pause=0.02) as run:
        writer, watchers = run.writer, run.watchers
        await asyncio.to_thread(own_cluster.migrate_slot, key_slot(moving.encode()), target)
        moved_at = time.time()
        assert own_cluster.owner_of(moving) is target
        await run.running
        await check_outcome(watchers, writer, run.api, jobs)
        delay = first_delivery_after(watchers, [moving], moved_at)
        with capsys.disabled():
            print(f"\nslot migrated: first update of the moved job {delay * 1000:.0f} ms after the "
                  f"move; {writer.refused} requests refused meanwhile")


async def test_an_engine_stopped_after_a_failed_command_closes_its_connections(
    own_cluster: RedisClusterProcesses,
) -> None:
    """A command that failed on a dead node leaves redis-py's cluster client waiting to re-read
    the slot map, and its aclose() then closes nothing; the engine's stop closes every
    connection anyway (seen from the live primaries: only our own check stays connected)."""
    engine = open_engine(f"{own_cluster.url}?prefix=closing")
    await engine.start()
    jobs = ids_on_every_shard(own_cluster, 1, "closing")
    for job_id in jobs:
        assert await engine.load(job_id) is None  # a connection to every primary
    victim = own_cluster.owner_of(jobs[0])
    live = [own_cluster.node_at(a) for a in own_cluster.shards() if own_cluster.node_at(a) is not victim]
    for node in own_cluster.nodes:
        if node not in live and node is not victim:
            with node.client() as client:
                replicating = client.info("replication")
            if replicating.get("master_port") == victim.port:
                node.kill()  # no failover: the dead shard stays dead
    victim.kill()
    with pytest.raises(EngineUnavailable):
        await engine.load(jobs[0])
    await engine.stop()
    for node in live:
        with node.client() as client:
            connected = client.client_list(_type="normal")
        assert len(connected) == 1, f"{node.address}: {[c['addr'] for c in connected]} still connected"
