"""``wait_replicas``: a write is acknowledged only once that many replicas have it.

A private primary and replica (never the shared Redis): the replica is frozen with SIGSTOP
to make replication stall, which nothing else here can do to a live server."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
from tests.support.redis_servers import RedisNode

from phasecast.engines import open_engine
from phasecast.engines.base import Decided
from phasecast.engines.redis import RedisEngine
from phasecast.errors import ConfigurationError, EngineUnavailable
from phasecast.model import JobState, Phase, ProgressUpdate
from phasecast.tracker import ProgressTracker

pytestmark = pytest.mark.redis


@pytest.fixture
def replicated() -> Iterator[tuple[RedisNode, RedisNode]]:
    primary = RedisNode(aof=False)
    with primary, RedisNode(aof=False, extra=("--replicaof", "127.0.0.1", str(primary.port))) as replica:
        deadline = time.monotonic() + 20
        while replica.client().info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never connected"
            time.sleep(0.05)
        yield primary, replica


def _on_replica(replica: RedisNode, engine: RedisEngine, job_id: str) -> JobState | None:
    raw = replica.client().hget(engine.keys.job(job_id), "state")
    return None if raw is None else JobState.from_json(str(raw))


async def test_every_acknowledged_write_is_on_the_replica_and_a_stalled_one_is_refused(
    replicated: tuple[RedisNode, RedisNode],
) -> None:
    primary, replica = replicated
    engine = open_engine(f"{primary.url}?prefix=w&wait_replicas=1&wait_timeout_ms=300")
    assert isinstance(engine, RedisEngine)
    async with ProgressTracker(engine) as tracker:
        created = await tracker.create(owner="alice", job_id="w1")
        assert _on_replica(replica, engine, "w1") == created
        reported = await tracker.report("w1", Phase.ANALYZING, 10, "reading")
        assert reported.applied and _on_replica(replica, engine, "w1") == reported.state
        batch = await tracker.update_many_json([
            ("w1", ProgressUpdate(Phase.ANALYZING, phase_progress=20)),
            ("w1", ProgressUpdate(Phase.ANALYZING, phase_progress=30)),
        ])
        assert all(isinstance(r, Decided) and r.applied for r in batch)
        last = batch[-1]
        assert isinstance(last, Decided)
        assert _on_replica(replica, engine, "w1") == JobState.from_json(last.state_json)

        # Replication stalls: the write is stored on the primary, but not acknowledged.
        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(EngineUnavailable, match="not applied twice"):
                await tracker.report("w1", Phase.ANALYZING, 40)
            stalled = await tracker.update_many_json([
                ("w1", ProgressUpdate(Phase.ANALYZING, phase_progress=50)),
                ("w1", ProgressUpdate(Phase.ANALYZING, phase_progress=50)),  # a repeat
            ])
            assert all(isinstance(r, EngineUnavailable) for r in stalled)
            with pytest.raises(EngineUnavailable):
                await tracker.complete("w1")
            assert (await tracker.get("w1")).phase is Phase.COMPLETE  # on the primary
        finally:
            replica.process.send_signal(signal.SIGCONT)

        # Sent again once replication is back: acknowledged, not applied a second time.
        again = await tracker.complete("w1")
        assert not again.applied and again.state.phase is Phase.COMPLETE
        assert _on_replica(replica, engine, "w1") == again.state
        history = await tracker.history("w1")
        assert [e["phase_progress"] for e in history] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0]


async def test_without_wait_replicas_writes_do_not_wait_for_replication(
    replicated: tuple[RedisNode, RedisNode],
) -> None:
    """The default: a write is acknowledged once the primary has it (stored, not yet
    replicated), so a frozen replica does not hold writes up."""
    primary, replica = replicated
    async with ProgressTracker(open_engine(f"{primary.url}?prefix=n")) as tracker:
        await tracker.create(owner="alice", job_id="n1")
        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)
        try:
            assert (await tracker.report("n1", Phase.ANALYZING, 10)).applied
        finally:
            replica.process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize(
    "query",
    ["wait_replicas=-1", "wait_replicas=x", "wait_replicas=1&wait_timeout_ms=0",
     "wait_timeout_ms=1.5"],
)
def test_bad_wait_options_are_refused(query: str) -> None:
    with pytest.raises(ConfigurationError):
        open_engine(f"redis://127.0.0.1:6379/0?{query}")


async def test_a_cluster_refuses_wait_replicas(cluster_engine_url: str) -> None:
    engine = open_engine(f"{cluster_engine_url}&wait_replicas=1")
    with pytest.raises(ConfigurationError, match="wait_replicas"):
        await engine.start()
    await engine.stop()
