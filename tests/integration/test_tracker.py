"""The service API on each engine: rules end to end, concurrency, watching."""

from __future__ import annotations

import asyncio

import pytest

from phasecast.engines import open_engine
from phasecast.errors import InvalidUpdate, JobExists, JobNotFound, JobTerminal
from phasecast.model import JobState, Phase
from phasecast.tracker import ProgressTracker


async def drive_to_completion(tracker: ProgressTracker, job_id: str) -> None:
    await tracker.report(job_id, Phase.ANALYZING, 50, "Reading")
    await tracker.report(job_id, Phase.ANALYZING, 100)
    for panel in range(1, 4):
        await tracker.step(job_id, Phase.GENERATING, f"panel-{panel}", 100, steps_total=3)
    await tracker.report(job_id, Phase.POST_PROCESSING, 100)
    await tracker.complete(job_id, "Done")


async def test_a_job_runs_through_every_phase(tracker: ProgressTracker) -> None:
    state = await tracker.create("comic", owner="alice", job_id="c1", metadata={"title": "T"})
    assert state.seq == 1
    await drive_to_completion(tracker, "c1")
    final = await tracker.get("c1")
    assert final.phase is Phase.COMPLETE
    assert final.progress == 100.0
    assert list(final.phases) == ["QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]
    history = await tracker.history("c1")
    progresses = [e["progress"] for e in history]
    assert progresses == sorted(progresses)
    assert [e["seq"] for e in history] == list(range(1, final.seq + 1))


async def test_errors_from_the_service_api(tracker: ProgressTracker) -> None:
    await tracker.create(owner="alice", job_id="c1")
    with pytest.raises(JobExists):
        await tracker.create(owner="alice", job_id="c1")
    with pytest.raises(JobNotFound):
        await tracker.report("nope", Phase.ANALYZING, 10)
    with pytest.raises(InvalidUpdate):
        await tracker.report("c1", Phase.ANALYZING, 150)
    await tracker.cancel("c1", "user left")
    with pytest.raises(JobTerminal):
        await tracker.report("c1", Phase.ANALYZING, 10)
    assert (await tracker.get("c1")).message == "user left"


async def test_late_reports_are_acknowledged_not_applied(tracker: ProgressTracker) -> None:
    await tracker.create(owner="alice", job_id="c1")
    await tracker.report("c1", Phase.GENERATING, 50)
    late = await tracker.report("c1", Phase.ANALYZING, 90)
    assert not late.applied
    assert late.state.phase is Phase.GENERATING
    assert (await tracker.get("c1")).seq == late.state.seq


@pytest.mark.redis
async def test_two_trackers_on_one_redis_lose_no_update(redis_engine_url: str) -> None:
    """Two writers (two server processes' worth of trackers) report steps at the same time:
    every step lands, because a write computed from a stale state is retried, not stored.
    (SQLite serves one process, where the per-job lock already serialises writers.)"""
    async with (
        ProgressTracker(open_engine(redis_engine_url)) as first,
        ProgressTracker(open_engine(redis_engine_url)) as second,
    ):
        await first.create(owner="alice", job_id="c1")
        await first.report("c1", Phase.GENERATING)

        async def panels(tracker: ProgressTracker, names: list[str]) -> None:
            for name in names:
                await tracker.step("c1", Phase.GENERATING, name, 100, steps_total=40)

        await asyncio.gather(
            panels(first, [f"a{i}" for i in range(20)]),
            panels(second, [f"b{i}" for i in range(20)]),
        )
        final = await first.get("c1")
        assert len(final.steps) == 40
        assert final.phase_progress == 100.0
        assert final.seq == 2 + 40


async def test_watch_yields_the_current_state_then_changes_to_the_end(tracker: ProgressTracker) -> None:
    await tracker.create(owner="alice", job_id="c1")
    seen: list[JobState] = []
    async with tracker.watch("c1") as states:
        driver = asyncio.create_task(drive_to_completion(tracker, "c1"))
        async for state in states:
            seen.append(state)
        await driver
    assert seen[-1].phase is Phase.COMPLETE
    seqs = [s.seq for s in seen]
    assert seqs == sorted(set(seqs))
    progress = [s.progress for s in seen]
    assert progress == sorted(progress)
    assert tracker.hub.watchers == 0


async def test_watch_since_the_final_seq_ends_at_once(tracker: ProgressTracker) -> None:
    await tracker.create(owner="alice", job_id="c1")
    final = (await tracker.complete("c1")).state
    async with tracker.watch("c1", since=final.seq) as states:
        assert [s async for s in states] == []


async def test_eta_is_learned_from_finished_jobs(tracker: ProgressTracker) -> None:
    await tracker.create(owner="alice", job_id="first")
    await drive_to_completion(tracker, "first")
    await tracker.settled()  # learning runs in the background after completion
    stats = await tracker.engine.load_stats("comic")
    assert Phase.ANALYZING in stats and Phase.GENERATING in stats
    second = await tracker.create(owner="alice", job_id="second")
    assert second.eta_seconds is not None
