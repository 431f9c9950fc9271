"""Write ``tests/vectors/rules.json``: the rules' test vectors.

Each vector is a prior state, a progress report or an ending, the time, the phase weights and learned
durations, and what the Python model (the specification: ``model.apply_progress`` then
``progress.estimate_eta``, or ``model.apply_terminal``) answers: applied or not and the stored state's exact JSON, or the
error. ``tests/vectors/test_rule_vectors.py`` holds the model and every engine's atomic step
(the Lua script on Redis, the transaction on SQLite) to these answers.

Regenerate after a deliberate change to the rules, and review the diff:

    .venv/bin/python -m tests.vectors.generate
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from phasecast.engines.base import Ending
from phasecast.errors import PhasecastError
from phasecast.model import (
    MAX_STEPS,
    WORKING_PHASES,
    JobError,
    JobState,
    Phase,
    ProgressUpdate,
    apply_progress,
    apply_terminal,
    format_time,
    new_job,
)
from phasecast.progress import COMIC_WEIGHTS, PhaseStat, PhaseStats, estimate_eta

HERE = Path(__file__).parent
VECTORS = HERE / "rules.json"
START = datetime(2026, 11, 29, 10, 0, 0, 123456, tzinfo=UTC)

MESSAGES = [
    None, "", "Drawing panel 3", "Zeichnen ✏️ Panel «3» — 漫画", 'quote " and \\ backslash',
    "new\nline\ttab\r\x01\x1f\x7f", "</script><b>", "x" * 120, "\U0001f600 astral",
]
STEP_IDS = ["panel-1", "panel-2", "panel-3", "error", "steps_total", "metadata", "a.b:c_d-e"]
WEIGHTS = [
    {p.value: w for p, w in COMIC_WEIGHTS.items()},
    {"QUEUED": 0.0, "ANALYZING": 1.0, "GENERATING": 1.0, "POST_PROCESSING": 1.0},
    {"QUEUED": 0.5, "ANALYZING": 0.1, "GENERATING": 7.3, "POST_PROCESSING": 0.0},
    {"QUEUED": 0.0, "ANALYZING": 0.0, "GENERATING": 3.0, "POST_PROCESSING": 0.0},
]
STATS = [
    {},
    {"ANALYZING": 12.5, "GENERATING": 60.0, "POST_PROCESSING": 9.75},
    {"GENERATING": 33.333333333333336},
    {"QUEUED": 0.2, "ANALYZING": 1e-05, "GENERATING": 123456.789, "POST_PROCESSING": 0.1},
]
METADATA: list[dict[str, Any]] = [
    {},
    {"title": "Space cats", "panels": 6, "tags": [], "extra": {}},
    {"nested": [[1, [2, {"x": 1e-07}]], 1e22, -0.0, True, None], "u": "ü\n\"", "f": 0.1},
    {"error": "not the error", "steps_total": 3, "metadata": {"steps": {}}},
]
OWNERS = ["alice", 'o"dd\\owner ✓']


def _progress(rng: random.Random, floor: float) -> float:
    pick = rng.random()
    if pick < 0.15:
        return floor  # a repeat
    if pick < 0.25:
        return max(0.0, floor - rng.uniform(0, 10))  # late
    if pick < 0.35:
        return rng.choice([0.0, 100.0, 12.5, 0.0625, 33.3335, 99.9995, 50.0])
    value = rng.uniform(floor, 100.0)
    digits = rng.choice([0, 1, 2, 3, 4, 6, None])
    return value if digits is None else round(value, digits)


def _update(rng: random.Random, state: JobState) -> ProgressUpdate:
    rank = state.phase.rank if not state.terminal else 0
    move = rng.random()
    if move < 0.65:
        phase = WORKING_PHASES[min(rank, 3)]
    elif move < 0.9:
        phase = WORKING_PHASES[min(rank + 1, 3)]
    else:
        phase = WORKING_PHASES[rng.randrange(0, 4)]
    message = rng.choice(MESSAGES) if rng.random() < 0.6 else None
    if rng.random() < 0.45:
        status = rng.choice([None, None, "pending", "running", "done", "failed"])
        progress = None if status == "done" and rng.random() < 0.5 else _progress(rng, 0.0)
        if rng.random() < 0.2:
            progress = None
        total = rng.choice([None, None, None, 3, 6, 12])
        return ProgressUpdate(phase, step=rng.choice(STEP_IDS), step_progress=progress,
                              step_status=status, steps_total=total, message=message)
    if rng.random() < 0.1:
        return ProgressUpdate(phase, message=message if message is not None else "only a message")
    return ProgressUpdate(phase, phase_progress=_progress(rng, state.phase_progress), message=message)


def _ending(rng: random.Random) -> Ending:
    phase = rng.choice([Phase.COMPLETE, Phase.FAILED, Phase.CANCELLED])
    error = None
    if phase is Phase.FAILED and rng.random() < 0.8:
        error = JobError(rng.choice(["oom", "timeout"]), rng.choice(["CUDA out of memory", 'a "b" \\ ü\n']))
    return Ending(phase, rng.choice([None, None, "Done: 6 panels", "Abgebrochen ✋"]), error)


def _update_dict(update: ProgressUpdate | Ending) -> dict[str, Any]:
    if isinstance(update, Ending):
        ending: dict[str, Any] = {"end": update.phase.value, "message": update.message}
        if update.error is not None:
            ending["error"] = update.error.to_dict()
        return ending
    out: dict[str, Any] = {"phase": update.phase.value}
    for name in ("phase_progress", "step", "step_progress", "step_status", "steps_total", "message"):
        value = getattr(update, name)
        if value is not None:
            out[name] = value
    return out


def update_of(data: dict[str, Any]) -> ProgressUpdate | Ending:
    if "end" in data:
        error = data.get("error")
        return Ending(Phase(data["end"]), data.get("message"),
                      None if error is None else JobError(error["code"], error["message"]))
    return ProgressUpdate(
        Phase(data["phase"]),
        phase_progress=data.get("phase_progress"),
        step=data.get("step"),
        step_progress=data.get("step_progress"),
        step_status=data.get("step_status"),
        steps_total=data.get("steps_total"),
        message=data.get("message"),
    )


def weights_of(data: dict[str, float]) -> dict[Phase, float]:
    return {Phase(k): float(v) for k, v in data.items()}


def stats_of(data: dict[str, float]) -> PhaseStats:
    return {Phase(k): PhaseStat(float(v), 3) for k, v in data.items()}


def decide(
    state: JobState, update: ProgressUpdate | Ending, now: datetime, weights: dict[Phase, float],
    stats: PhaseStats,
) -> dict[str, Any]:
    """The specification: what an engine's atomic step must answer."""
    try:
        if isinstance(update, Ending):
            outcome = apply_terminal(state, update.phase, now, message=update.message,
                                     error=update.error)
        else:
            outcome = apply_progress(state, update, now, weights)
    except PhasecastError as exc:
        return {"error": type(exc).__name__}
    if not outcome.applied:
        return {"applied": False, "state": state.to_json()}
    new = outcome.state
    if not new.terminal:
        new.eta_seconds = estimate_eta(new, now, stats, weights)
    return {"applied": True, "state": new.to_json()}


def _vector(
    name: str, state: JobState, update: ProgressUpdate | Ending, now: datetime, weights: dict[str, float],
    stats: dict[str, float],
) -> dict[str, Any]:
    expected = decide(state, update, now, weights_of(weights), stats_of(stats))
    return {
        "name": name,
        "prior": state.to_json(),
        "update": _update_dict(update),
        "now": now.isoformat(),
        "weights": weights,
        "stats": stats,
        "expected": expected,
    }


def _walks(rng: random.Random, count: int, length: int) -> list[dict[str, Any]]:
    vectors = []
    for walk in range(count):
        now = START + timedelta(microseconds=rng.randrange(0, 10**9))
        state = new_job(job_id=f"walk-{walk}", owner=rng.choice(OWNERS), kind="comic",
                        metadata=rng.choice(METADATA), now=now)
        state.epoch = f"{rng.getrandbits(48):012x}"  # new_job draws one at random
        weights, stats = rng.choice(WEIGHTS), rng.choice(STATS)
        after_end = 0
        for index in range(length):
            if state.terminal:
                after_end += 1
                if after_end > 2:
                    break  # a repeat or two of the ending is enough
            now += timedelta(microseconds=rng.choice([1, 999, 1000, 250_000, 3_000_000, 61_234_567]))
            update: ProgressUpdate | Ending = _update(rng, state)
            if rng.random() < (0.5 if state.terminal else 0.05):
                update = _ending(rng)
            vector = _vector(f"walk {walk} step {index}", state, update, now, weights, stats)
            vectors.append(vector)
            if vector["expected"].get("applied"):
                state = JobState.from_json(vector["expected"]["state"])
    return vectors


def _special(rng: random.Random) -> list[dict[str, Any]]:
    vectors = []
    now = START
    base = new_job(job_id="special", owner="alice", kind="comic", metadata={"k": [1.5, {}]}, now=now)
    base.epoch = "0123456789ab"  # new_job draws one at random
    weights, stats = WEIGHTS[0], STATS[1]

    # A finished job refuses every report.
    for phase in (Phase.COMPLETE, Phase.FAILED, Phase.CANCELLED):
        ended = apply_terminal(base, phase, now + timedelta(seconds=1),
                               error=JobError("boom", "it broke") if phase is Phase.FAILED else None)
        vectors.append(_vector(f"ended {phase.value}", ended.state,
                               ProgressUpdate(Phase.GENERATING, phase_progress=10.0),
                               now + timedelta(seconds=2), weights, stats))

    # Many steps: the mean adds them up in their stored order.
    many = apply_progress(base, ProgressUpdate(Phase.GENERATING, steps_total=40), now, COMIC_WEIGHTS).state
    for index in range(37):
        many = apply_progress(many, ProgressUpdate(
            Phase.GENERATING, step=f"p{rng.randrange(10**6)}", step_progress=rng.uniform(0, 100)),
            now + timedelta(milliseconds=index), COMIC_WEIGHTS).state
    vectors.append(_vector("many steps, one more", many, ProgressUpdate(
        Phase.GENERATING, step="last", step_progress=1 / 3), now + timedelta(seconds=5), weights, stats))

    # One step too many.
    full = many.copy()
    full.steps = {f"s{i}": {"progress": 1.0, "status": "running"} for i in range(MAX_STEPS)}
    vectors.append(_vector("step limit", full, ProgressUpdate(Phase.GENERATING, step="extra",
                                                              step_progress=5.0),
                           now + timedelta(seconds=6), weights, stats))

    # Elapsed time and rounding edges of the ETA and the overall progress.
    for micros, progress in [(1, 0.001), (999, 50.0), (1_000_000, 12.5), (86_400_000_001, 99.999),
                             (3_600_000_000, 0.0625), (5, 100.0)]:
        vectors.append(_vector(f"eta after {micros} us at {progress}", base, ProgressUpdate(
            Phase.QUEUED, phase_progress=progress), now + timedelta(microseconds=micros),
            rng.choice(WEIGHTS), rng.choice(STATS)))

    # Entering a phase without a message shows that phase's default, never the previous
    # phase's message; a message of its own (even "") is kept.
    analysing = apply_progress(base, ProgressUpdate(Phase.ANALYZING, phase_progress=60.0,
                                                    message="Finding the characters"),
                               now, COMIC_WEIGHTS).state
    later = now + timedelta(seconds=7)
    for name, update in [
        ("phase only", ProgressUpdate(Phase.GENERATING)),
        ("phase progress", ProgressUpdate(Phase.GENERATING, phase_progress=5.0)),
        ("a step", ProgressUpdate(Phase.GENERATING, step="panel-1", step_progress=10.0, steps_total=6)),
        ("steps total only", ProgressUpdate(Phase.GENERATING, steps_total=6)),
        ("skipping a phase", ProgressUpdate(Phase.POST_PROCESSING, phase_progress=30.0)),
        ("own message", ProgressUpdate(Phase.POST_PROCESSING, phase_progress=0.0, message="Lettering")),
        ("empty message", ProgressUpdate(Phase.GENERATING, message="")),
        ("same phase", ProgressUpdate(Phase.ANALYZING, phase_progress=80.0)),
    ]:
        vectors.append(_vector(f"entering without a message: {name}", analysing, update, later,
                               weights, stats))
    vectors.append(_vector("entering without a message from QUEUED", base,
                           ProgressUpdate(Phase.ANALYZING, phase_progress=1.0), later, weights, stats))

    # Only COMPLETE is 100: the last phase done, or a phase done with nothing weighed after
    # it, stops below; the endings keep the progress where it stopped.
    packaging = apply_progress(base, ProgressUpdate(Phase.POST_PROCESSING, phase_progress=70.0,
                                                    message="Assembling pages"), now, COMIC_WEIGHTS).state
    all_done = many.copy()
    all_done.steps = {step: {"progress": 100.0, "status": "done"} for step in many.steps}
    all_done.steps_total = None
    done_cases: list[tuple[str, JobState, ProgressUpdate, dict[str, float]]] = [
        ("last phase at 100", packaging,
         ProgressUpdate(Phase.POST_PROCESSING, phase_progress=100.0, message="Packaging"), WEIGHTS[0]),
        ("entering the last phase at 100", base,
         ProgressUpdate(Phase.POST_PROCESSING, phase_progress=100.0), WEIGHTS[1]),
        ("generating done, nothing weighed after", base,
         ProgressUpdate(Phase.GENERATING, phase_progress=100.0), WEIGHTS[3]),
        ("every step done, nothing weighed after", all_done,
         ProgressUpdate(Phase.GENERATING, steps_total=len(all_done.steps)), WEIGHTS[2]),
    ]
    for name, prior, update, case_weights in done_cases:
        vector = _vector(f"below 100 before COMPLETE: {name}", prior, update, later, case_weights, stats)
        vectors.append(vector)
        stopped = JobState.from_json(vector["expected"]["state"])
        for end in (Phase.FAILED, Phase.CANCELLED, Phase.COMPLETE):
            vectors.append(_vector(f"below 100 before COMPLETE: {name}, then {end.value}", stopped,
                                   Ending(end), later + timedelta(seconds=1), case_weights, stats))
    vectors.append(_vector("below 100 before COMPLETE: the last step done", all_done, ProgressUpdate(
        Phase.GENERATING, step="last", step_status="done"), later, WEIGHTS[3], stats))
    # A state stored at 100 by an earlier version stays there: progress never goes back.
    legacy = packaging.copy()
    legacy.phase_progress, legacy.progress = 100.0, 100.0
    vectors.append(_vector("stored at 100 before COMPLETE stays", legacy, ProgressUpdate(
        Phase.POST_PROCESSING, message="Still packaging"), later, weights, stats))
    return vectors


def generate() -> list[dict[str, Any]]:
    rng = random.Random(20261129)
    return _special(rng) + _walks(rng, 26, 12)


def main() -> None:
    vectors = generate()
    VECTORS.write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")
    outcomes = [v["expected"].get("error") or ("applied" if v["expected"]["applied"] else "ignored")
                for v in vectors]
    print(f"{len(vectors)} vectors -> {VECTORS}: "
          + ", ".join(f"{k} {outcomes.count(k)}" for k in sorted(set(outcomes))))


if __name__ == "__main__":
    main()


__all__ = ["VECTORS", "decide", "format_time", "generate", "stats_of", "update_of", "weights_of"]
