"""The one backoff rule every retry loop uses (phasecast.backoff)."""

from __future__ import annotations

import random

import pytest

from phasecast.backoff import backoff_delay, jittered


def test_the_ceiling_doubles_from_base_up_to_cap_and_equal_jitter_keeps_the_upper_half() -> None:
    rng = random.Random(7)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (40, 1.0), (10_000, 1.0)):
        delays = [backoff_delay(attempt, base=0.1, cap=1.0, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 100  # jittered, not a fixed step


def test_full_jitter_may_retry_at_once() -> None:
    rng = random.Random(3)
    delays = [backoff_delay(3, base=1.0, cap=10.0, jitter="full", rng=rng) for _ in range(500)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert min(delays) < 0.5


def test_attempts_count_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(0, base=1, cap=2)


def test_jittered_spreads_a_period() -> None:
    rng = random.Random(1)
    values = [jittered(10.0, 0.2, rng) for _ in range(200)]
    assert all(8.0 <= v <= 12.0 for v in values) and max(values) - min(values) > 2
