"""Phase weights per job kind, and the time-remaining estimate.

The estimate blends two sources: the rate observed in the current phase so far, and the
typical duration of each phase for this kind, learned from finished jobs (an exponentially
weighted mean kept by the engine). Early in a phase the typical duration dominates; as the
phase progresses, the observed rate takes over.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from phasecast.errors import ConfigurationError
from phasecast.model import WORKING_PHASES, JobState, Phase, parse_time

COMIC_WEIGHTS: dict[Phase, float] = {
    Phase.QUEUED: 0.0,
    Phase.ANALYZING: 10.0,
    Phase.GENERATING: 70.0,
    Phase.POST_PROCESSING: 20.0,
}

# How much each newly finished job moves the learned typical duration.
LEARNING_RATE = 0.3


class WeightTable:
    """Weights for each job kind; kinds without their own entry use the default."""

    def __init__(
        self,
        per_kind: Mapping[str, Mapping[Phase, float]] | None = None,
        default: Mapping[Phase, float] = COMIC_WEIGHTS,
    ) -> None:
        self._default = _checked(dict(default), "default")
        self._per_kind = {kind: _checked(dict(w), kind) for kind, w in (per_kind or {}).items()}

    def for_kind(self, kind: str) -> dict[Phase, float]:
        return self._per_kind.get(kind, self._default)

    @classmethod
    def from_json(cls, text: str) -> WeightTable:
        """Parse ``{"comic": {"ANALYZING": 10, ...}, "*": {...}}``; ``*`` replaces the default."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"phase weights are not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigurationError("phase weights must be a JSON object keyed by job kind")
        tables: dict[str, dict[Phase, float]] = {}
        for kind, weights in raw.items():
            if not isinstance(weights, dict):
                raise ConfigurationError(f"weights for kind {kind!r} must be an object")
            try:
                tables[kind] = {Phase(name): float(value) for name, value in weights.items()}
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"weights for kind {kind!r}: {exc}; phases are "
                    + ", ".join(p.value for p in WORKING_PHASES)
                ) from exc
        default = tables.pop("*", COMIC_WEIGHTS)
        return cls(tables, default)


def _checked(weights: dict[Phase, float], kind: str) -> dict[Phase, float]:
    for phase, value in weights.items():
        if phase.terminal:
            raise ConfigurationError(f"weights for {kind!r}: {phase.value} is terminal and has no weight")
        if value < 0:
            raise ConfigurationError(f"weights for {kind!r}: {phase.value} must not be negative")
    if sum(weights.values()) <= 0:
        raise ConfigurationError(f"weights for {kind!r} must add up to more than zero")
    return weights


@dataclass(slots=True, frozen=True)
class PhaseStat:
    mean_seconds: float
    samples: int


PhaseStats = dict[Phase, PhaseStat]


def learn(previous: PhaseStat | None, seconds: float) -> PhaseStat:
    if previous is None:
        return PhaseStat(seconds, 1)
    mean = previous.mean_seconds + LEARNING_RATE * (seconds - previous.mean_seconds)
    return PhaseStat(mean, previous.samples + 1)


def estimate_eta(
    state: JobState, now: datetime, stats: PhaseStats, weights: dict[Phase, float]
) -> float | None:
    """Seconds until the job completes, or None while nothing is known to base it on."""
    if state.phase.terminal:
        return 0.0 if state.phase is Phase.COMPLETE else None
    span = state.phases.get(state.phase.value) or {}
    started = span.get("started_at")
    elapsed = max(0.0, (now - parse_time(started)).total_seconds()) if started else 0.0

    # Seconds per unit of weight in the current phase: lets phases never seen before be
    # estimated from the pace of this one, since weights encode relative duration.
    pace: float | None = None
    rate_remaining: float | None = None
    fraction = state.phase_progress / 100.0
    if fraction > 0 and elapsed > 0:
        phase_total = elapsed / fraction
        rate_remaining = phase_total - elapsed
        weight = weights.get(state.phase, 0.0)
        if weight > 0:
            pace = phase_total / weight

    typical = stats.get(state.phase)
    typical_remaining = None if typical is None else max(0.0, typical.mean_seconds - elapsed)
    if rate_remaining is not None and typical_remaining is not None:
        current = fraction * rate_remaining + (1 - fraction) * typical_remaining
    elif rate_remaining is not None:
        current = rate_remaining
    elif typical_remaining is not None:
        current = typical_remaining
    else:
        return None

    later = 0.0
    for phase in WORKING_PHASES:
        if phase.rank <= state.phase.rank:
            continue
        stat = stats.get(phase)
        if stat is not None:
            later += stat.mean_seconds
        elif weights.get(phase, 0.0) == 0:
            continue
        elif pace is not None:
            later += pace * weights[phase]
        else:
            return None
    return round(current + later, 1)
