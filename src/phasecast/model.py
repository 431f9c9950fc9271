"""Phases, job state and the rules that decide whether an update may be applied.

Everything here is pure: no I/O, no clocks read implicitly. Engines store what these
functions return; the tracker feeds them the current state and the time.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from phasecast.errors import InvalidUpdate, JobTerminal


class Phase(StrEnum):
    QUEUED = "QUEUED"
    ANALYZING = "ANALYZING"
    GENERATING = "GENERATING"
    POST_PROCESSING = "POST_PROCESSING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_PHASES

    @property
    def rank(self) -> int:
        # Terminal phases all rank after every working phase: a job can end from anywhere.
        return _RANK[self]


WORKING_PHASES: tuple[Phase, ...] = (
    Phase.QUEUED,
    Phase.ANALYZING,
    Phase.GENERATING,
    Phase.POST_PROCESSING,
)
TERMINAL_PHASES: frozenset[Phase] = frozenset({Phase.COMPLETE, Phase.FAILED, Phase.CANCELLED})
_RANK: dict[Phase, int] = {p: i for i, p in enumerate(WORKING_PHASES)} | {
    p: len(WORKING_PHASES) for p in TERMINAL_PHASES
}

StepStatus = Literal["pending", "running", "done", "failed"]
STEP_STATUSES: tuple[str, ...] = get_args(StepStatus)

# Ids are matched with ``fullmatch`` (``match`` would let a trailing newline through ``$``).
# The text of each pattern is also what the OpenAPI document publishes: in JSON Schema's
# dialect ``$`` is the end of the text, so there it means the same.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
JOB_ID_RULE = "1-128 characters of letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
STEP_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
STEP_ID_RULE = "1-64 characters of letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
KIND_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_METADATA_BYTES = 16 * 1024
# Nesting levels of metadata, the metadata object itself being level 1. Deeper JSON is
# refused: every reader (Python, Lua in Redis, browsers) must be able to decode what is stored.
MAX_JSON_DEPTH = 32
MAX_MESSAGE_CHARS = 500
MAX_OWNER_CHARS = 256
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 2000
MAX_STEPS = 1000


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339, UTC, millisecond precision: ``2026-11-29T04:10:00.123Z``."""
    m = moment.astimezone(UTC)
    # Formatted by hand: strftime costs several times more, once per report.
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:"
            f"{m.second:02d}.{m.microsecond // 1000:03d}Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_epoch() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(slots=True)
class JobError:
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(slots=True)
class JobState:
    """The public state of one job. ``to_dict`` is the wire contract (docs/protocol.md)."""

    job_id: str
    owner: str
    kind: str
    phase: Phase
    phase_progress: float
    progress: float
    message: str
    eta_seconds: float | None
    seq: int
    epoch: str
    created_at: str
    updated_at: str
    phases: dict[str, dict[str, str | None]] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps_total: int | None = None
    error: JobError | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.phase.terminal

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "owner": self.owner,
            "kind": self.kind,
            "phase": self.phase.value,
            "phase_progress": self.phase_progress,
            "progress": self.progress,
            "message": self.message,
            "eta_seconds": self.eta_seconds,
            "seq": self.seq,
            "epoch": self.epoch,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "phases": self.phases,
            "steps": self.steps,
            "steps_total": self.steps_total,
            "error": None if self.error is None else self.error.to_dict(),
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobState:
        error = data.get("error")
        return cls(
            job_id=data["job_id"],
            owner=data["owner"],
            kind=data["kind"],
            phase=Phase(data["phase"]),
            phase_progress=float(data["phase_progress"]),
            progress=float(data["progress"]),
            message=data.get("message", ""),
            eta_seconds=data.get("eta_seconds"),
            seq=int(data["seq"]),
            epoch=data["epoch"],
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            phases=data.get("phases") or {},
            steps=data.get("steps") or {},
            steps_total=data.get("steps_total"),
            error=None if not error else JobError(code=error["code"], message=error["message"]),
            metadata=data.get("metadata") or {},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> JobState:
        return cls.from_dict(json.loads(text))

    def copy(self) -> JobState:
        """A copy whose timeline, steps and error can change without touching this one.
        Metadata is shared: nothing changes it after creation."""
        return JobState(
            job_id=self.job_id,
            owner=self.owner,
            kind=self.kind,
            phase=self.phase,
            phase_progress=self.phase_progress,
            progress=self.progress,
            message=self.message,
            eta_seconds=self.eta_seconds,
            seq=self.seq,
            epoch=self.epoch,
            created_at=self.created_at,
            updated_at=self.updated_at,
            phases={name: dict(span) for name, span in self.phases.items()},
            steps={name: dict(step) for name, step in self.steps.items()},
            steps_total=self.steps_total,
            error=None if self.error is None else JobError(self.error.code, self.error.message),
            metadata=self.metadata,
        )


# --- Updates -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ProgressUpdate:
    """A report from a worker. Either ``phase_progress`` or a ``step`` report (or neither:
    entering a phase, or only changing the message)."""

    phase: Phase
    phase_progress: float | None = None
    step: str | None = None
    step_progress: float | None = None
    step_status: StepStatus | None = None
    steps_total: int | None = None
    message: str | None = None


@dataclass(slots=True, frozen=True)
class Outcome:
    """What happened to an update: ``applied`` is False for a late or duplicate report,
    which is acknowledged but changes nothing."""

    applied: bool
    state: JobState


# --- Validation: the one authority for what may be stored --------------------------------
#
# REST (routes and batch), the WebSocket and SSE (job ids), the in-process tracker and the
# worker SDK all call these. Each raises ``InvalidUpdate(field, problem)``; the message says
# how to fix the value.


def is_job_id(text: object) -> bool:
    return isinstance(text, str) and JOB_ID_PATTERN.fullmatch(text) is not None


def validate_job_id(job_id: object, field: str = "job_id") -> str:
    if not isinstance(job_id, str):
        raise InvalidUpdate(field, f"must be a string of {JOB_ID_RULE}")
    if JOB_ID_PATTERN.fullmatch(job_id) is None:
        shown = job_id if len(job_id) <= 40 else job_id[:40] + "…"
        raise InvalidUpdate(field, f"must be {JOB_ID_RULE}; got {shown!r}")
    return job_id


def validate_step_id(step: object, field: str = "step") -> str:
    if not isinstance(step, str) or STEP_ID_PATTERN.fullmatch(step) is None:
        raise InvalidUpdate(field, f"must be {STEP_ID_RULE}")
    return step


def validate_text(field: str, value: object, *, max_chars: int, min_chars: int = 0) -> str:
    """A string that every store and reader keeps as it is: valid Unicode (no lone
    surrogates), no NUL, within its length limits."""
    if not isinstance(value, str):
        raise InvalidUpdate(field, f"must be a string, got {type(value).__name__}")
    if not min_chars <= len(value) <= max_chars:
        raise InvalidUpdate(field, f"must be {min_chars} to {max_chars} characters, got {len(value)}")
    _check_unicode(field, value, stored=True)
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")
# The rule of validate_text on NUL as a JSON Schema pattern, for the OpenAPI document.
STORED_TEXT_PATTERN = "^[^\\u0000]*$"


def storable_text(text: str, max_chars: int) -> str:
    """Someone else's text (a RunPod error, say) made fit for a job's state: lone surrogates
    and NUL become U+FFFD, and text longer than ``max_chars`` is cut with an ellipsis."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)  # in a str, any surrogate left is a lone one
    if len(text) > max_chars:
        text = text[: max(0, max_chars - 1)] + "…"
    return text


def _check_unicode(field: str, text: str, *, stored: bool = False) -> None:
    if stored and "\x00" in text:
        # PostgreSQL (the archive) keeps no NUL in text or jsonb: a state holding one could be
        # served live but never archived, and would stall the archive behind it.
        raise InvalidUpdate(
            field, f"contains a NUL character (U+0000) at character {text.index(chr(0))}; "
            "remove it (the archive cannot store it)",
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidUpdate(
                field,
                f"is not valid Unicode: a lone surrogate ({text[exc.start]!r}) at character "
                f"{exc.start}; encode text as UTF-8, or escape astral characters as surrogate pairs",
            ) from None


class DuplicateKey(ValueError):
    """An object of untrusted JSON names one key twice (``loads_untrusted``); ``field`` is
    the key's path from the top (``updates.0.phase``, ``metadata.a``)."""

    def __init__(self, key: str, field: str | None = None) -> None:
        super().__init__(f"the key {key!r} appears more than once in one object")
        self.key = key
        self.field = field or key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a key named twice in one object: parsers disagree
    on which value wins (the first, the last, an error), so two readers of the same body
    could act on different values."""
    built = dict(pairs)
    if len(built) != len(pairs):
        raise DuplicateKey(_first_repeated(pairs))
    return built


def _first_repeated(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no key is repeated")


class _Repeated(dict[str, Any]):
    """An object that named ``key`` twice, kept while its path is looked for."""

    key = ""


def _marking_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    built = dict(pairs)
    if len(built) == len(pairs):
        return built
    marked = _Repeated(built)
    marked.key = _first_repeated(pairs)
    return marked


_UNTRUSTED = json.JSONDecoder(object_pairs_hook=_unique_object)
_MARKING = json.JSONDecoder(object_pairs_hook=_marking_object)


def loads_untrusted(text: str) -> Any:
    """``json.loads`` for JSON from outside (request bodies, WebSocket messages, webhooks):
    the same, except that an object naming a key twice raises ``DuplicateKey`` with the
    key's path (a ``ValueError``, as every other parse error)."""
    try:
        return _UNTRUSTED.decode(text)
    except DuplicateKey:
        pass
    # Parsed again (only then) to name where: the first repeated key in document order.
    stack: list[tuple[Any, str]] = [(_MARKING.decode(text), "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Repeated):
            raise DuplicateKey(item.key, f"{path}.{item.key}" if path else item.key)
        if isinstance(item, dict):
            children: list[tuple[Any, Any]] = list(item.items())
        elif isinstance(item, list):
            children = list(enumerate(item))
        else:
            continue
        for key, child in reversed(children):
            stack.append((child, f"{path}.{key}" if path else str(key)))
    raise AssertionError("a repeated key was found and then lost")


def check_json(
    value: object, field: str, *, max_depth: int = MAX_JSON_DEPTH, level: int = 1,
    stored: bool = False,
) -> None:
    """Raise unless ``value`` is JSON that every reader decodes the same way: objects with
    string keys, arrays, valid Unicode strings, finite numbers, booleans and null, with no
    object or array deeper than level ``max_depth`` (``value`` itself is at ``level``).
    ``field`` names the value in errors, extended with the path (``metadata.a.0``); an empty
    ``field`` is a whole request body. ``stored``: the value goes into a job's state, so its
    strings (keys too) must not hold NUL either."""
    stack: list[tuple[object, str, int]] = [(value, field, level)]
    while stack:
        item, path, depth = stack.pop()
        where = path or "body"
        if isinstance(item, dict | list) and depth > max_depth:
            raise InvalidUpdate(where, f"nests deeper than {max_depth} levels; flatten it")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidUpdate(where, f"has a key that is not a string: {key!r}")
                inner = f"{path}.{key}" if path else key
                _check_unicode(inner, key, stored=stored)
                stack.append((child, inner, depth + 1))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                stack.append((child, f"{path}.{index}" if path else str(index), depth + 1))
        elif isinstance(item, str):
            _check_unicode(where, item, stored=stored)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidUpdate(
                    where, f"must be a finite number; {item!r} is not JSON (NaN and Infinity are refused)"
                )
        elif item is not None and not isinstance(item, bool | int):
            raise InvalidUpdate(where, f"is a {type(item).__name__}, which is not a JSON value")


def validate_metadata(metadata: object) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise InvalidUpdate("metadata", "must be a JSON object")
    check_json(metadata, "metadata", stored=True)
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise InvalidUpdate(
            "metadata", f"is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES} bytes"
        )
    return metadata


def validate_percent(name: str, value: object) -> float:
    # bool is an int in Python; true/false are not numbers on the wire.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidUpdate(name, f"must be a number from 0 to 100, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or value > 100:
        raise InvalidUpdate(name, f"must be a number from 0 to 100, got {value!r}")
    return float(value)


def validate_kind(kind: object) -> str:
    if not isinstance(kind, str) or KIND_PATTERN.fullmatch(kind) is None:
        raise InvalidUpdate("kind", "must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return kind


def validate_owner(owner: object) -> str:
    return validate_text("owner", owner, min_chars=1, max_chars=MAX_OWNER_CHARS)


def validate_message(message: str | None, field: str = "message") -> None:
    if message is not None:
        validate_text(field, message, max_chars=MAX_MESSAGE_CHARS)


def validate_job_error(error: JobError) -> None:
    validate_text("error.code", error.code, min_chars=1, max_chars=MAX_ERROR_CODE_CHARS)
    validate_text("error.message", error.message, min_chars=1, max_chars=MAX_ERROR_MESSAGE_CHARS)


def validate_update(update: ProgressUpdate) -> None:
    """Every rule a progress report must meet whatever the job's state."""
    if not isinstance(update.phase, Phase):
        raise InvalidUpdate("phase", f"must be one of {', '.join(p.value for p in WORKING_PHASES)}")
    if update.phase.terminal:
        raise InvalidUpdate(
            "phase",
            f"{update.phase.value} is terminal; use the complete, fail or cancel call instead",
        )
    if update.phase_progress is not None:
        validate_percent("phase_progress", update.phase_progress)
    if update.step_progress is not None:
        validate_percent("step_progress", update.step_progress)
    if update.step is not None:
        validate_step_id(update.step)
        if update.phase_progress is not None:
            raise InvalidUpdate(
                "phase_progress",
                "cannot be sent with a step: a phase with steps takes the mean of its steps",
            )
    else:
        if update.step_progress is not None:
            raise InvalidUpdate("step", "is required when step_progress is given")
        if update.step_status is not None:
            raise InvalidUpdate("step", "is required when step_status is given")
    if update.step_status is not None and update.step_status not in STEP_STATUSES:
        raise InvalidUpdate("step_status", f"must be one of {', '.join(STEP_STATUSES)}")
    if update.steps_total is not None and (
        isinstance(update.steps_total, bool)
        or not isinstance(update.steps_total, int)
        or not 1 <= update.steps_total <= MAX_STEPS
    ):
        raise InvalidUpdate("steps_total", f"must be an integer from 1 to {MAX_STEPS}")
    validate_message(update.message)


def new_job(
    *,
    job_id: str,
    owner: str,
    kind: str,
    metadata: dict[str, Any],
    now: datetime,
    message: str = "Queued",
) -> JobState:
    validate_message(message)
    stamp = format_time(now)
    return JobState(
        job_id=validate_job_id(job_id),
        owner=validate_owner(owner),
        kind=validate_kind(kind),
        phase=Phase.QUEUED,
        phase_progress=0.0,
        progress=0.0,
        message=message,
        eta_seconds=None,
        seq=1,
        epoch=new_epoch(),
        created_at=stamp,
        updated_at=stamp,
        phases={Phase.QUEUED.value: {"started_at": stamp, "finished_at": None}},
        metadata=validate_metadata(metadata),
    )


def _enter_phase(state: JobState, phase: Phase, stamp: str) -> None:
    """Close the current phase and open ``phase`` with nothing carried over: its progress,
    its steps and its message start afresh (the message is the phase's default until the
    report, or the ending, brings its own)."""
    current = state.phases.get(state.phase.value)
    if current is not None and current.get("finished_at") is None:
        current["finished_at"] = stamp
    state.phases[phase.value] = {
        "started_at": stamp,
        "finished_at": stamp if phase.terminal else None,
    }
    state.phase = phase
    state.phase_progress = 100.0 if phase is Phase.COMPLETE else 0.0
    state.steps = {}
    state.steps_total = None
    state.message = DEFAULT_MESSAGE[phase]


def _apply_step(state: JobState, update: ProgressUpdate) -> None:
    assert update.step is not None
    step = state.steps.get(update.step)
    if step is None:
        if len(state.steps) >= MAX_STEPS:
            raise InvalidUpdate("step", f"a phase may have at most {MAX_STEPS} steps")
        step = {"progress": 0.0, "status": "pending"}
        state.steps[update.step] = step
    if step["status"] == "done":
        return  # a finished step stays finished; late reports about it change nothing
    status = update.step_status
    progress = update.step_progress
    if status == "done":
        progress = 100.0
    if progress is not None:
        step["progress"] = max(float(step["progress"]), float(progress))
    if status is not None:
        step["status"] = status
    elif step["status"] in ("pending", "failed") and progress is not None:
        step["status"] = "running"
    if step["progress"] >= 100.0 and step["status"] != "failed":
        step["status"] = "done"


def steps_mean(steps: dict[str, dict[str, Any]], steps_total: int | None) -> float:
    count = max(len(steps), steps_total or 0)
    if count == 0:
        return 0.0
    return sum(float(s["progress"]) for s in steps.values()) / count


def apply_progress(
    state: JobState, update: ProgressUpdate, now: datetime, weights: dict[Phase, float]
) -> Outcome:
    """Apply a worker's report to a copy of ``state``.

    Raises ``JobTerminal`` for a job that has ended and ``InvalidUpdate`` for a report that
    could never be valid. A report that is merely late (an earlier phase, lower progress) or a
    repeat of what is already known returns ``Outcome(applied=False)`` with the state unchanged.
    """
    validate_update(update)
    if state.terminal:
        raise JobTerminal(state.job_id, state.phase)
    if update.phase.rank < state.phase.rank:
        return Outcome(False, state)

    new = state.copy()
    stamp = format_time(now)
    if update.phase.rank > state.phase.rank:
        _enter_phase(new, update.phase, stamp)
    if update.steps_total is not None:
        new.steps_total = max(new.steps_total or 0, update.steps_total)
    if update.step is not None:
        _apply_step(new, update)
    if new.steps:
        # Monotonic by construction: a report that would lower the mean (say, a larger
        # steps_total arriving late) leaves the phase's progress where viewers last saw it.
        new.phase_progress = max(new.phase_progress, round(steps_mean(new.steps, new.steps_total), 3))
    elif update.phase_progress is not None:
        if update.phase_progress < new.phase_progress:
            return Outcome(False, state)
        new.phase_progress = float(update.phase_progress)
    if update.message is not None:
        new.message = update.message
    new.progress = max(state.progress, overall_progress(new.phase, new.phase_progress, weights))

    if _same_content(state, new):
        return Outcome(False, state)
    new.seq = state.seq + 1
    new.updated_at = stamp
    return Outcome(True, new)


def apply_terminal(
    state: JobState,
    phase: Phase,
    now: datetime,
    *,
    message: str | None = None,
    error: JobError | None = None,
) -> Outcome:
    """End a job. Repeating the same ending is acknowledged and ignored; ending a job that
    already ended differently raises ``JobTerminal``."""
    if not phase.terminal:
        raise ValueError(f"{phase} is not a terminal phase")
    validate_message(message)
    if error is not None:
        validate_job_error(error)
    if state.terminal:
        if state.phase is phase:
            return Outcome(False, state)
        raise JobTerminal(state.job_id, state.phase)
    new = state.copy()
    stamp = format_time(now)
    steps, steps_total = new.steps, new.steps_total
    _enter_phase(new, phase, stamp)
    if phase is not Phase.COMPLETE:
        # Keep the picture of how far each step got when the job stopped.
        new.steps, new.steps_total = steps, steps_total
    new.progress = 100.0 if phase is Phase.COMPLETE else state.progress
    new.phase_progress = 100.0 if phase is Phase.COMPLETE else state.phase_progress
    new.message = message if message is not None else DEFAULT_END_MESSAGE[phase]
    new.error = error
    new.eta_seconds = 0.0 if phase is Phase.COMPLETE else None
    new.seq = state.seq + 1
    new.updated_at = stamp
    return Outcome(True, new)


DEFAULT_END_MESSAGE = {
    Phase.COMPLETE: "Complete",
    Phase.FAILED: "Failed",
    Phase.CANCELLED: "Cancelled",
}
# The message a job shows on entering a phase when the report (or ending) that moves it
# there brings none: the previous phase's message never carries over. The Redis script
# (engines/lua/apply.lua) holds the same table; tests/vectors keeps them in agreement.
DEFAULT_MESSAGE: dict[Phase, str] = {
    Phase.QUEUED: "Queued",
    Phase.ANALYZING: "Analyzing",
    Phase.GENERATING: "Generating",
    Phase.POST_PROCESSING: "Post-processing",
} | DEFAULT_END_MESSAGE

# Only a COMPLETE job is at 100 %: a working job's overall progress stops here even when
# every phase reports 100 (the last phase done, the ending not yet reported).
MAX_WORKING_PROGRESS = 99.9


def overall_progress(phase: Phase, phase_progress: float, weights: dict[Phase, float]) -> float:
    """Weighted sum over the working phases: every earlier phase counts in full, the current
    one by its own progress. Rounded to 0.001 so repeated reports compare equal. Only
    COMPLETE is 100: a working phase stops at ``MAX_WORKING_PROGRESS``."""
    if phase is Phase.COMPLETE:
        return 100.0
    total = sum(weights.get(p, 0.0) for p in WORKING_PHASES)
    if total <= 0:
        return 0.0
    if phase.terminal:
        raise ValueError("overall progress of a failed or cancelled job is where it stopped")
    done = sum(weights.get(p, 0.0) for p in WORKING_PHASES if p.rank < phase.rank)
    current = weights.get(phase, 0.0) * phase_progress / 100.0
    return round(min(MAX_WORKING_PROGRESS, 100.0 * (done + current) / total), 3)


def _same_content(old: JobState, new: JobState) -> bool:
    return (
        old.phase is new.phase
        and old.phase_progress == new.phase_progress
        and old.message == new.message
        and old.steps == new.steps
        and old.steps_total == new.steps_total
    )


def phase_durations(state: JobState) -> dict[Phase, float]:
    """Seconds spent in each working phase that both started and finished."""
    out: dict[Phase, float] = {}
    for name, span in state.phases.items():
        phase = Phase(name)
        if phase.terminal or not span.get("finished_at") or not span.get("started_at"):
            continue
        start, end = parse_time(str(span["started_at"])), parse_time(str(span["finished_at"]))
        out[phase] = max(0.0, (end - start).total_seconds())
    return out
