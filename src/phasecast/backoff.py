"""Capped exponential backoff with jitter, the one rule every retry loop in Phasecast uses
(Redis reconnects, the archive writer, the RunPod poller, the worker SDK, the Python
client)."""

from __future__ import annotations

import random
from typing import Literal

_MAX_EXPONENT = 30


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: Literal["equal", "full"] = "equal",
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry): the ceiling
    doubles from ``base`` up to ``cap``, and jitter spreads clients failing together apart:
    ``equal`` waits between half the ceiling and the ceiling (servers: never hammer),
    ``full`` anywhere from 0 to the ceiling (clients: a first retry may be at once)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, base * 2 ** min(attempt - 1, _MAX_EXPONENT))
    low = 0.0 if jitter == "full" else ceiling / 2
    return (rng or random).uniform(low, ceiling)


def jittered(seconds: float, spread: float = 0.2, rng: random.Random | None = None) -> float:
    """``seconds`` give or take ``spread`` (a fraction): periodic work of many instances and
    many items drifts apart instead of firing in step."""
    return seconds * (rng or random).uniform(1 - spread, 1 + spread)
