"""The service API on each engine: rules end to end, concurrency, watching."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from phasecast.engines import open_engine
from phasecast.engines.base import Decided
from phasecast.errors import InvalidUpdate, JobExists, JobNotFound, JobTerminal
from phasecast.model import JobState, Phase, ProgressUpdate
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


async def test_a_batch_answers_each_report_in_order_as_one_by_one_would(
    tracker: ProgressTracker,
) -> None:
    """``update_many_json``: reports of one job apply in the order given, each on its own; a
    refused report is answered with its error, in its place, and stores nothing; the other
    reports (of that job too) still apply."""
    await tracker.create(owner="alice", job_id="b1")
    await tracker.create(owner="alice", job_id="b2")
    await tracker.create(owner="alice", job_id="b3")
    await tracker.cancel("b3")
    reports = [
        ("b1", ProgressUpdate(Phase.ANALYZING, phase_progress=10)),
        ("b2", ProgressUpdate(Phase.GENERATING, step="p1", step_progress=50, steps_total=2)),
        ("b1", ProgressUpdate(Phase.ANALYZING, phase_progress=150)),  # invalid
        ("b1", ProgressUpdate(Phase.ANALYZING, phase_progress=40, message="more")),
        ("nope", ProgressUpdate(Phase.ANALYZING, phase_progress=10)),
        ("b1", ProgressUpdate(Phase.ANALYZING, phase_progress=20)),  # late: not applied
        ("b3", ProgressUpdate(Phase.ANALYZING, phase_progress=10)),  # ended
        ("b2", ProgressUpdate(Phase.GENERATING, step="p2", step_status="done")),
        ("b1", ProgressUpdate(Phase.GENERATING, phase_progress=5)),
    ]
    results = await tracker.update_many_json(reports)
    assert len(results) == len(reports)
    assert isinstance(results[2], InvalidUpdate)
    assert isinstance(results[4], JobNotFound)
    assert isinstance(results[6], JobTerminal)
    decided = {i: r for i, r in enumerate(results) if isinstance(r, Decided)}
    assert sorted(decided) == [0, 1, 3, 5, 7, 8]
    assert [decided[i].applied for i in (0, 1, 3, 5, 7, 8)] == [True, True, True, False, True, True]
    states = {i: JobState.from_json(d.state_json) for i, d in decided.items()}
    assert [states[i].seq for i in (0, 3, 5, 8)] == [2, 3, 3, 4]
    assert states[3].message == "more" and states[3].phase_progress == 40
    assert states[5] == states[3]  # the late report answers with the stored state
    assert states[8].phase is Phase.GENERATING
    assert states[7].steps["p2"]["status"] == "done" and states[7].seq == 3
    for i, d in decided.items():
        assert d.summary() == (states[i].seq, states[i].phase.value, states[i].progress)
    assert await tracker.get("b1") == states[8]
    assert await tracker.get("b2") == states[7]
    history = await tracker.history("b1")
    assert [e["seq"] for e in history] == [1, 2, 3, 4]

    # The same reports one by one, on jobs in the same starting states, end the same way.
    for job_id in ("c1", "c2", "c3"):
        await tracker.create(owner="alice", job_id=job_id)
    await tracker.cancel("c3")
    renamed = {"b1": "c1", "b2": "c2", "b3": "c3", "nope": "nope"}
    for job_id, update in reports:
        with contextlib.suppress(InvalidUpdate, JobNotFound, JobTerminal):
            await tracker.update_json(renamed[job_id], update)
    for b, c in (("b1", "c1"), ("b2", "c2")):
        one, other = await tracker.get(b), await tracker.get(c)
        assert (one.seq, one.phase, one.phase_progress, one.progress, one.message, one.steps) == (
            other.seq, other.phase, other.phase_progress, other.progress, other.message, other.steps
        )


async def test_a_batch_learns_the_kind_of_jobs_it_did_not_know(tracker: ProgressTracker) -> None:
    """A report decided with another kind's weights is decided again with the job's own."""
    await tracker.create("video", owner="bob", job_id="v1")
    other = ProgressTracker(tracker.engine)  # knows nothing of v1
    results = await other.update_many_json([
        ("v1", ProgressUpdate(Phase.ANALYZING, phase_progress=50)),
        ("v1", ProgressUpdate(Phase.ANALYZING, phase_progress=60)),
    ])
    assert all(isinstance(r, Decided) and r.applied for r in results)
    stored = await tracker.get("v1")
    assert stored.seq == 3 and stored.phase_progress == 60
    assert stored == JobState.from_json(results[1].state_json)  # type: ignore[union-attr]


async def test_writers_of_one_job_take_turns_in_order_and_a_cancelled_one_gives_up_its_place(
    tracker: ProgressTracker,
) -> None:
    await tracker.create(owner="alice", job_id="t1")
    tasks = [
        asyncio.create_task(tracker.report("t1", Phase.ANALYZING, float(i))) for i in range(1, 11)
    ]
    await asyncio.sleep(0)  # one loop turn: each writer has started (the first is writing)
    tasks[4].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[4], asyncio.CancelledError)
    done = [r for i, r in enumerate(results) if i != 4]
    assert all(not isinstance(r, BaseException) and r.applied for r in done)
    assert [r.state.seq for r in done if not isinstance(r, BaseException)] == list(range(2, 11))
    assert (await tracker.get("t1")).phase_progress == 10.0
    # Nobody holds or waits for the job any more: the next writer goes straight in.
    assert (await asyncio.wait_for(tracker.report("t1", Phase.ANALYZING, 11.0), 5)).applied
