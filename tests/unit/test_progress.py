"""Weights per kind and the time-remaining estimate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from phasecast.errors import ConfigurationError
from phasecast.model import JobState, Phase, ProgressUpdate, apply_progress, new_job
from phasecast.progress import COMIC_WEIGHTS, PhaseStat, WeightTable, estimate_eta, learn

T0 = datetime(2026, 11, 29, 4, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def in_phase(phase: Phase, progress: float, entered: float) -> JobState:
    state = new_job(job_id="j", owner="o", kind="comic", metadata={}, now=T0)
    return apply_progress(state, ProgressUpdate(phase, phase_progress=progress), at(entered), COMIC_WEIGHTS).state


def test_nothing_known_means_no_estimate() -> None:
    state = new_job(job_id="j", owner="o", kind="comic", metadata={}, now=T0)
    assert estimate_eta(state, at(1), {}, COMIC_WEIGHTS) is None


def test_rate_in_the_current_phase_and_weights_estimate_unseen_phases() -> None:
    # 25 % of GENERATING took 10 s: 30 s left in it; POST_PROCESSING (weight 20 vs 70)
    # is estimated from that pace: 40 s * 20 / 70.
    state = in_phase(Phase.GENERATING, 25, entered=0)
    eta = estimate_eta(state, at(10), {}, COMIC_WEIGHTS)
    assert eta == pytest.approx(30 + 40 * 20 / 70, abs=0.1)


def test_learned_durations_dominate_early_and_the_rate_late() -> None:
    stats = {Phase.GENERATING: PhaseStat(100.0, 5), Phase.POST_PROCESSING: PhaseStat(10.0, 5)}
    early = estimate_eta(in_phase(Phase.GENERATING, 1, entered=0), at(10), stats, COMIC_WEIGHTS)
    # 1 % in 10 s alone would say 990 s; the learned 100 s phase pulls it near 90 s + 10 s.
    assert early is not None and 95 < early < 120
    late = estimate_eta(in_phase(Phase.GENERATING, 90, entered=0), at(90), stats, COMIC_WEIGHTS)
    assert late == pytest.approx(0.9 * 10 + 0.1 * 10 + 10, abs=0.2)


def test_terminal_estimates() -> None:
    state = in_phase(Phase.GENERATING, 10, entered=0)
    state.phase = Phase.COMPLETE
    assert estimate_eta(state, at(1), {}, COMIC_WEIGHTS) == 0.0
    state.phase = Phase.FAILED
    assert estimate_eta(state, at(1), {}, COMIC_WEIGHTS) is None


def test_learning_is_an_exponentially_weighted_mean() -> None:
    first = learn(None, 10.0)
    assert first == PhaseStat(10.0, 1)
    second = learn(first, 20.0)
    assert second.samples == 2
    assert second.mean_seconds == pytest.approx(13.0)


def test_weights_per_kind_from_json() -> None:
    table = WeightTable.from_json('{"video": {"GENERATING": 90, "POST_PROCESSING": 10}, "*": {"GENERATING": 1}}')
    assert table.for_kind("video") == {Phase.GENERATING: 90.0, Phase.POST_PROCESSING: 10.0}
    assert table.for_kind("comic") == {Phase.GENERATING: 1.0}
    assert WeightTable().for_kind("anything") == COMIC_WEIGHTS


@pytest.mark.parametrize(
    "text",
    ['{"x": {"COMPLETE": 5}}', '{"x": {"GENERATING": -1}}', '{"x": {"NOPE": 1}}', "[1]", "{", '{"x": {}}'],
)
def test_bad_weights_are_configuration_errors(text: str) -> None:
    with pytest.raises(ConfigurationError):
        WeightTable.from_json(text)
