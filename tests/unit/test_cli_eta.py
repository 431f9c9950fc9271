"""What ``phasecast watch`` prints as time left, for each kind of state."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from phasecast.cli import _eta_text
from phasecast.model import JobState, Phase, new_job


def _state(phase: Phase, eta: float | None) -> JobState:
    state = new_job(job_id="eta", owner="alice", kind="comic", metadata={},
                    now=datetime(2026, 11, 29, tzinfo=UTC))
    state.phase = phase
    state.eta_seconds = eta
    return state


@pytest.mark.parametrize(
    ("phase", "eta", "shown"),
    [
        (Phase.GENERATING, 12.4, "~12s left"),
        (Phase.QUEUED, None, ""),
        (Phase.POST_PROCESSING, 0.0, "finishing…"),
        (Phase.COMPLETE, 0.0, ""),
        (Phase.FAILED, None, ""),
        (Phase.CANCELLED, 3.0, ""),
    ],
)
def test_time_left_is_never_zero_seconds(phase: Phase, eta: float | None, shown: str) -> None:
    assert _eta_text(_state(phase, eta)) == shown
