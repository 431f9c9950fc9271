"""Phasecast behind Redis Sentinel (issue 10, section 1): the primary killed mid-job, or
demoted alive by a failover the sentinels were asked for (then with ``wait_replicas=1``),
with watchers on two server instances; the replica is promoted, writes resume (503s during
the election are fine), watchers get live updates again, and every watcher ends with the
terminal state, with no acknowledged update lost or reordered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from tests.support.failover import check_outcome, first_delivery_after, instances, jobs_under_way
from tests.support.process import ServerProcess
from tests.support.redis_servers import RedisSentinelProcesses

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def own_sentinel() -> Iterator[RedisSentinelProcesses]:
    """A deployment for one test: this one kills its primary."""
    with RedisSentinelProcesses(sentinels=3, quorum=2) as deployment:
        yield deployment


@pytest.fixture
async def two_instances(
    own_sentinel: RedisSentinelProcesses, tmp_path: Path, how: str
) -> AsyncIterator[list[ServerProcess]]:
    query = "prefix=failover"
    if how == "demoted":
        # A primary demoted while alive keeps acknowledging writes from its own point of
        # view until the sentinels reconfigure it, then resyncs from the new primary and
        # those writes are gone: without WAIT this case lost 31 to 41 acknowledged updates
        # in three runs. With every write waiting for a replica, none is acknowledged that
        # the promoted replica does not have.
        query += "&wait_replicas=1&wait_timeout_ms=300"
    with instances(f"{own_sentinel.url}?{query}", tmp_path) as servers:
        yield servers


@pytest.mark.parametrize("how", ["killed", "demoted"])
async def test_the_primary_lost_mid_job_is_replaced_and_watchers_end_complete(
    how: str, own_sentinel: RedisSentinelProcesses, two_instances: list[ServerProcess],
    make_token: Callable[..., str], worker_token: str, capsys: pytest.CaptureFixture[str],
) -> None:
    jobs = ["sentinel-1", "sentinel-2", "sentinel-3"]
    victim = own_sentinel.current_primary()
    async with jobs_under_way(two_instances, worker_token, make_token("alice"), jobs, until=jobs[0]) as run:
        writer, watchers = run.writer, run.watchers
        lost_at = time.time()
        if how == "killed":
            victim.kill()
        else:
            # The old primary lives on as a replica: writes still sent to it are refused
            # (read-only) and must find the new primary.
            with own_sentinel.sentinels[0].client() as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", own_sentinel.SERVICE)
        promoted = await asyncio.to_thread(own_sentinel.wait_promoted, victim)
        promoted_at = time.time()
        assert promoted is own_sentinel.replica
        await run.running
        await check_outcome(watchers, writer, run.api, jobs)
        # Live again: every watcher got several updates of every job after the promotion,
        # not only the state reloaded when its feed came back.
        for watcher in watchers:
            for job_id in jobs:
                later = [r for r in watcher.states[job_id] if r.received_at >= promoted_at]
                assert len(later) >= 2, f"{job_id}: {len(later)} updates after the promotion"
        delay = first_delivery_after(watchers, jobs, promoted_at)
        with capsys.disabled():
            print(f"\nsentinel failover, primary {how}: replica promoted "
                  f"{promoted_at - lost_at:.1f}s later; first live update {delay * 1000:.0f} ms after the promotion; "
                  f"{writer.refused} requests refused (503) meanwhile")
