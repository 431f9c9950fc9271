"""Capped exponential backoff with jitter, the one rule every retry loop in Phasecast uses
(Redis reconnects, the archive writer, the RunPod poller, the worker SDK)."""

from __future__ import annotations

import random

_MAX_EXPONENT = 30


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry): the delay
    doubles from ``base`` up to ``cap``, and a random half of it is dropped ("equal jitter")
    so that clients failing together do not retry together."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, base * 2 ** min(attempt - 1, _MAX_EXPONENT))
    return (rng or random).uniform(ceiling / 2, ceiling)


def jittered(seconds: float, spread: float = 0.2, rng: random.Random | None = None) -> float:
    """``seconds`` give or take ``spread`` (a fraction): periodic work of many instances and
    many items drifts apart instead of firing in step."""
    return seconds * (rng or random).uniform(1 - spread, 1 + spread)
