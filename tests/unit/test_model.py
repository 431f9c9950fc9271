"""The progress rules: phases forward only, progress never backwards, terminal is final."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from phasecast.errors import InvalidUpdate, JobTerminal
from phasecast.model import (
    DEFAULT_MESSAGE,
    MAX_WORKING_PROGRESS,
    JobError,
    JobState,
    Phase,
    ProgressUpdate,
    apply_progress,
    apply_terminal,
    format_time,
    new_job,
    overall_progress,
    phase_durations,
)
from phasecast.progress import COMIC_WEIGHTS

T0 = datetime(2026, 11, 29, 4, 0, 0, 123456, tzinfo=UTC)


def job(**metadata: object) -> JobState:
    return new_job(job_id="comic-1", owner="alice", kind="comic", metadata=dict(metadata), now=T0)


def advance(state: JobState, update: ProgressUpdate, seconds: float = 1.0) -> JobState:
    outcome = apply_progress(state, update, T0 + timedelta(seconds=seconds), COMIC_WEIGHTS)
    assert outcome.applied, update
    return outcome.state


def test_new_job_is_queued_with_seq_one_and_a_timeline() -> None:
    state = job(title="x")
    assert state.phase is Phase.QUEUED
    assert (state.seq, state.progress, state.phase_progress) == (1, 0.0, 0.0)
    assert state.created_at == "2026-11-29T04:00:00.123Z"
    assert state.phases == {"QUEUED": {"started_at": state.created_at, "finished_at": None}}
    assert state.to_dict()["metadata"] == {"title": "x"}


def test_state_round_trips_through_json() -> None:
    state = advance(job(), ProgressUpdate(Phase.GENERATING, step="p1", step_progress=40, steps_total=4))
    assert JobState.from_json(state.to_json()) == state


def test_overall_progress_is_the_weighted_sum() -> None:
    assert overall_progress(Phase.QUEUED, 50, COMIC_WEIGHTS) == 0.0
    assert overall_progress(Phase.ANALYZING, 50, COMIC_WEIGHTS) == 5.0
    assert overall_progress(Phase.GENERATING, 50, COMIC_WEIGHTS) == 45.0
    assert overall_progress(Phase.POST_PROCESSING, 50, COMIC_WEIGHTS) == 90.0
    assert overall_progress(Phase.COMPLETE, 0, COMIC_WEIGHTS) == 100.0


@pytest.mark.parametrize(
    ("phase", "weights"),
    [
        (Phase.POST_PROCESSING, COMIC_WEIGHTS),
        (Phase.GENERATING, {Phase.GENERATING: 3.0, Phase.POST_PROCESSING: 0.0}),
        (Phase.ANALYZING, {Phase.ANALYZING: 1.0}),
        (Phase.QUEUED, {Phase.QUEUED: 1.0}),
    ],
)
def test_only_complete_is_100_overall(phase: Phase, weights: dict[Phase, float]) -> None:
    assert overall_progress(phase, 100, weights) == MAX_WORKING_PROGRESS < 100
    assert overall_progress(phase, 99.99999, weights) == MAX_WORKING_PROGRESS


def test_the_last_phase_done_stays_below_100_until_complete() -> None:
    state = advance(job(), ProgressUpdate(Phase.POST_PROCESSING, phase_progress=70, message="Assembling"))
    packed = advance(state, ProgressUpdate(Phase.POST_PROCESSING, phase_progress=100, message="Packaging"))
    assert (packed.phase_progress, packed.progress) == (100.0, MAX_WORKING_PROGRESS)
    complete = apply_terminal(packed, Phase.COMPLETE, T0 + timedelta(seconds=3)).state
    assert (complete.phase_progress, complete.progress) == (100.0, 100.0)
    for ending in (Phase.FAILED, Phase.CANCELLED):
        stopped = apply_terminal(packed, ending, T0 + timedelta(seconds=3)).state
        assert (stopped.phase_progress, stopped.progress) == (100.0, MAX_WORKING_PROGRESS)


def test_every_step_done_with_nothing_weighed_after_stays_below_100() -> None:
    weights = {Phase.GENERATING: 1.0}
    state = job()
    for n in range(3):
        outcome = apply_progress(state, ProgressUpdate(Phase.GENERATING, step=f"panel-{n}", step_status="done",
                                                       steps_total=3), T0, weights)
        state = outcome.state
    assert all(step["status"] == "done" for step in state.steps.values())
    assert (state.phase_progress, state.progress) == (100.0, MAX_WORKING_PROGRESS)


@pytest.mark.parametrize(
    "update",
    [
        ProgressUpdate(Phase.GENERATING),
        ProgressUpdate(Phase.GENERATING, phase_progress=5),
        ProgressUpdate(Phase.GENERATING, step="panel-1", step_progress=10, steps_total=6),
        ProgressUpdate(Phase.GENERATING, steps_total=6),
        ProgressUpdate(Phase.POST_PROCESSING, phase_progress=30),
    ],
)
def test_entering_a_phase_without_a_message_shows_its_default(update: ProgressUpdate) -> None:
    state = advance(job(), ProgressUpdate(Phase.ANALYZING, phase_progress=60, message="Finding the characters"))
    entered = advance(state, update)
    assert entered.message == DEFAULT_MESSAGE[update.phase] != state.message
    # Within the phase, a report without a message keeps the current one.
    later = advance(entered, ProgressUpdate(update.phase, step="panel-9", step_progress=50))
    assert later.message == entered.message


def test_default_messages_name_each_phase() -> None:
    assert [DEFAULT_MESSAGE[p] for p in Phase] == [
        "Queued", "Analyzing", "Generating", "Post-processing", "Complete", "Failed", "Cancelled",
    ]
    assert job().message == DEFAULT_MESSAGE[Phase.QUEUED]


def test_entering_a_phase_with_its_own_message_keeps_it() -> None:
    state = advance(job(), ProgressUpdate(Phase.ANALYZING, phase_progress=60, message="Finding the characters"))
    for message in ("All 6 panels drawn", ""):
        entered = advance(state, ProgressUpdate(Phase.POST_PROCESSING, phase_progress=0, message=message))
        assert entered.message == message


def test_entering_a_phase_closes_the_previous_one_in_the_timeline() -> None:
    state = advance(job(), ProgressUpdate(Phase.ANALYZING, phase_progress=30), seconds=2)
    assert state.phase is Phase.ANALYZING
    assert state.seq == 2
    assert state.phases["QUEUED"]["finished_at"] == format_time(T0 + timedelta(seconds=2))
    assert state.phases["ANALYZING"]["finished_at"] is None
    assert state.progress == 3.0


def test_phases_may_skip_forward() -> None:
    state = advance(job(), ProgressUpdate(Phase.POST_PROCESSING, phase_progress=50))
    assert state.phase is Phase.POST_PROCESSING
    assert state.progress == 90.0


def test_an_earlier_phase_is_acknowledged_and_ignored() -> None:
    state = advance(job(), ProgressUpdate(Phase.GENERATING, phase_progress=10))
    outcome = apply_progress(state, ProgressUpdate(Phase.ANALYZING, phase_progress=99), T0, COMIC_WEIGHTS)
    assert not outcome.applied
    assert outcome.state is state


def test_lower_phase_progress_is_ignored_and_equal_is_a_duplicate() -> None:
    state = advance(job(), ProgressUpdate(Phase.ANALYZING, phase_progress=60))
    for value in (59.9, 60):
        outcome = apply_progress(state, ProgressUpdate(Phase.ANALYZING, phase_progress=value), T0, COMIC_WEIGHTS)
        assert not outcome.applied
        assert outcome.state.seq == state.seq


def test_a_new_message_alone_is_a_change() -> None:
    state = advance(job(), ProgressUpdate(Phase.ANALYZING, phase_progress=60))
    state2 = advance(state, ProgressUpdate(Phase.ANALYZING, message="Still reading"))
    assert (state2.seq, state2.message, state2.phase_progress) == (state.seq + 1, "Still reading", 60.0)


def test_steps_drive_the_phase_progress_as_their_mean_over_the_declared_total() -> None:
    state = advance(job(), ProgressUpdate(Phase.GENERATING, step="panel-1", step_progress=100, steps_total=4))
    assert state.steps["panel-1"] == {"progress": 100.0, "status": "done"}
    assert state.phase_progress == 25.0
    state = advance(state, ProgressUpdate(Phase.GENERATING, step="panel-2", step_progress=50))
    assert state.steps["panel-2"]["status"] == "running"
    assert state.phase_progress == 37.5
    assert state.progress == pytest.approx(10 + 70 * 0.375)


def test_a_step_never_goes_backwards_and_done_is_final() -> None:
    state = advance(job(), ProgressUpdate(Phase.GENERATING, step="p", step_progress=70, steps_total=2))
    late = apply_progress(state, ProgressUpdate(Phase.GENERATING, step="p", step_progress=30), T0, COMIC_WEIGHTS)
    assert not late.applied
    done = advance(state, ProgressUpdate(Phase.GENERATING, step="p", step_status="done"))
    assert done.steps["p"] == {"progress": 100.0, "status": "done"}
    again = apply_progress(done, ProgressUpdate(Phase.GENERATING, step="p", step_status="failed"), T0, COMIC_WEIGHTS)
    assert not again.applied


def test_a_failed_step_can_be_retried_without_losing_its_progress() -> None:
    state = advance(job(), ProgressUpdate(Phase.GENERATING, step="p", step_progress=40, steps_total=2))
    failed = advance(state, ProgressUpdate(Phase.GENERATING, step="p", step_status="failed"))
    assert failed.steps["p"] == {"progress": 40.0, "status": "failed"}
    retried = advance(failed, ProgressUpdate(Phase.GENERATING, step="p", step_progress=10))
    assert retried.steps["p"] == {"progress": 40.0, "status": "running"}
    assert retried.phase_progress >= failed.phase_progress


def test_a_larger_steps_total_never_lowers_the_phase_progress() -> None:
    state = advance(job(), ProgressUpdate(Phase.GENERATING, step="a", step_status="done", steps_total=2))
    assert state.phase_progress == 50.0
    grown = advance(state, ProgressUpdate(Phase.GENERATING, step="b", step_progress=10, steps_total=10))
    assert grown.phase_progress == 50.0
    assert grown.progress >= state.progress


@pytest.mark.parametrize(
    ("update", "field"),
    [
        (ProgressUpdate(Phase.ANALYZING, phase_progress=100.5), "phase_progress"),
        (ProgressUpdate(Phase.ANALYZING, phase_progress=-1), "phase_progress"),
        (ProgressUpdate(Phase.ANALYZING, phase_progress=float("nan")), "phase_progress"),
        (ProgressUpdate(Phase.GENERATING, step="p", step_progress=101), "step_progress"),
        (ProgressUpdate(Phase.GENERATING, step_progress=5), "step"),
        (ProgressUpdate(Phase.GENERATING, step="bad id!", step_progress=5), "step"),
        (ProgressUpdate(Phase.GENERATING, step="p", phase_progress=5), "phase_progress"),
        (ProgressUpdate(Phase.GENERATING, step="p", steps_total=0), "steps_total"),
        (ProgressUpdate(Phase.ANALYZING, message="x" * 501), "message"),
        (ProgressUpdate(Phase.COMPLETE), "phase"),
    ],
)
def test_invalid_updates_name_the_field(update: ProgressUpdate, field: str) -> None:
    with pytest.raises(InvalidUpdate) as caught:
        apply_progress(job(), update, T0, COMIC_WEIGHTS)
    assert caught.value.field == field


def test_complete_sets_everything_to_one_hundred_and_is_final() -> None:
    state = advance(job(), ProgressUpdate(Phase.POST_PROCESSING, phase_progress=40))
    done = apply_terminal(state, Phase.COMPLETE, T0 + timedelta(seconds=5))
    assert done.applied
    end = done.state
    assert (end.phase, end.progress, end.phase_progress, end.eta_seconds) == (Phase.COMPLETE, 100.0, 100.0, 0.0)
    assert end.phases["POST_PROCESSING"]["finished_at"] is not None
    assert end.phases["COMPLETE"]["started_at"] == end.phases["COMPLETE"]["finished_at"]
    assert not apply_terminal(end, Phase.COMPLETE, T0).applied  # the same ending again
    with pytest.raises(JobTerminal):
        apply_terminal(end, Phase.CANCELLED, T0)
    with pytest.raises(JobTerminal):
        apply_progress(end, ProgressUpdate(Phase.POST_PROCESSING, phase_progress=100), T0, COMIC_WEIGHTS)


def test_failure_keeps_progress_and_steps_where_they_stopped() -> None:
    state = advance(job(), ProgressUpdate(Phase.GENERATING, step="p1", step_progress=50, steps_total=2))
    failed = apply_terminal(state, Phase.FAILED, T0, error=JobError("gpu_oom", "out of memory")).state
    assert failed.phase is Phase.FAILED
    assert failed.progress == state.progress
    assert failed.steps == state.steps
    assert failed.to_dict()["error"] == {"code": "gpu_oom", "message": "out of memory"}


def test_metadata_is_bounded() -> None:
    with pytest.raises(InvalidUpdate) as caught:
        job(blob="x" * 20_000)
    assert caught.value.field == "metadata"


def test_job_ids_are_checked() -> None:
    with pytest.raises(InvalidUpdate):
        new_job(job_id="../etc", owner="a", kind="comic", metadata={}, now=T0)


def test_phase_durations_cover_finished_working_phases() -> None:
    state = advance(job(), ProgressUpdate(Phase.ANALYZING, phase_progress=10), seconds=2)
    state = advance(state, ProgressUpdate(Phase.GENERATING, phase_progress=10), seconds=7)
    assert phase_durations(state) == {Phase.QUEUED: 2.0, Phase.ANALYZING: 5.0}


def test_format_time_writes_rfc3339_utc_milliseconds_from_any_zone() -> None:
    from datetime import timezone

    moments = [datetime(2026, 11, 29, 4, 10, 0, 123999, tzinfo=UTC),
               datetime(2000, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))),
               datetime(1970, 1, 1, 0, 0, 0, 0, tzinfo=UTC)]
    assert [format_time(m) for m in moments] == [
        "2026-11-29T04:10:00.123Z", "2000-03-01T04:59:59.999Z", "1970-01-01T00:00:00.000Z"
    ]
