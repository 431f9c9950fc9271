"""The storage interface every engine implements.

An engine stores job states, refuses a write whose base is stale (compare-and-set on
``seq``), keeps a bounded history per job, learns typical phase durations, and delivers every
accepted change to the process that registered ``on_change``. The rules about which change
is allowed live in ``phasecast.model``; engines only guarantee that a change is applied to
exactly the state it was computed from.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from phasecast.errors import ConfigurationError, JobNotFound, PhasecastError
from phasecast.model import (
    DEFAULT_END_MESSAGE,
    JobError,
    JobState,
    Phase,
    ProgressUpdate,
    apply_progress,
    apply_terminal,
    parse_time,
)
from phasecast.progress import PhaseStats, estimate_eta

if TYPE_CHECKING:
    from phasecast.engines.extensions import ArchiveOutbox, PanelRecords

DEFAULT_HISTORY_LIMIT = 1000


@dataclass(slots=True)
class Change:
    """One accepted state change. Built once per change per process and shared by every
    watcher. ``wire`` is where the transports keep what they encoded of it
    (``phasecast.server.frames``), so each wire form is encoded once per change, not once
    per watcher; storage never looks at it."""

    job_id: str
    seq: int
    terminal: bool
    state_json: str
    changed_at: float  # Unix seconds of ``updated_at``: the start of delivery latency
    wire: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, state: JobState, state_json: str | None = None) -> Change:
        return cls(
            job_id=state.job_id,
            seq=state.seq,
            terminal=state.terminal,
            state_json=state_json if state_json is not None else state.to_json(),
            changed_at=parse_time(state.updated_at).timestamp(),
        )



ChangeHandler = Callable[[Change], None]


@dataclass(slots=True, frozen=True)
class RuleInputs:
    """What a report is decided with besides the stored state: the caller's idea of the
    job's kind and owner (neither ever changes) and, for that kind, the phase weights and
    the learned phase durations (for the ETA)."""

    kind: str
    owner: str
    weights: dict[Phase, float]
    stats: PhaseStats


@dataclass(slots=True, frozen=True)
class Ending:
    """How a job ends: ``model.apply_terminal``'s arguments."""

    phase: Phase
    message: str | None = None
    error: JobError | None = None

    @property
    def text(self) -> str:
        """The message the ended job shows."""
        return self.message if self.message is not None else DEFAULT_END_MESSAGE[self.phase]


@dataclass(slots=True, frozen=True)
class Decided:
    """A report decided and, if ``applied``, stored: ``state_json`` is the stored state
    after the step (the unchanged one for a late or repeated report).

    An engine that knows them without parsing the state also fills ``seq``, ``phase`` and
    ``progress`` of that state (they do not take part in comparisons); ``summary()`` gives
    them either way."""

    applied: bool
    state_json: str
    seq: int | None = field(default=None, compare=False)
    phase: str | None = field(default=None, compare=False)
    progress: float | None = field(default=None, compare=False)

    def summary(self) -> tuple[int, str, float]:
        """``(seq, phase, progress)`` of the state: what a batch reply carries."""
        if self.seq is not None and self.phase is not None and self.progress is not None:
            return self.seq, self.phase, self.progress
        state = json.loads(self.state_json)
        return int(state["seq"]), str(state["phase"]), float(state["progress"])


@dataclass(slots=True, frozen=True)
class OtherJob:
    """The stored job has another kind or owner than the caller expected: nothing was
    decided; ask again with these."""

    kind: str
    owner: str


def check_successor(state: JobState, expected_seq: int) -> None:
    """A replacement moves seq up by exactly one; anything else is a caller's bug."""
    if state.seq != expected_seq + 1:
        raise ValueError(
            f"job {state.job_id!r}: a replacement of seq {expected_seq} must carry seq "
            f"{expected_seq + 1}, not {state.seq}"
        )


def history_entry(state: JobState) -> dict[str, Any]:
    """What the per-job history keeps of each change: enough to draw a timeline."""
    return {
        "seq": state.seq,
        "at": state.updated_at,
        "phase": state.phase.value,
        "phase_progress": state.phase_progress,
        "progress": state.progress,
        "message": state.message,
    }


class JobStore(abc.ABC):
    """Job states: compare-and-set writes, bounded history, learned phase durations.

    What every store promises (checked on each engine by the contract suite): an accepted
    write is durable before the call returns; a write whose base is stale stores nothing; a
    finished job never changes; each stored change is in the history, oldest first, at most
    the history limit of them."""

    @abc.abstractmethod
    async def insert(self, state: JobState) -> None:
        """Store a new job; raise ``JobExists`` if its id is taken."""

    @abc.abstractmethod
    async def load(self, job_id: str) -> JobState | None: ...

    @abc.abstractmethod
    async def replace(self, state: JobState, expected_seq: int) -> bool:
        """Store ``state`` only if the stored seq is still ``expected_seq``; append it to the
        history and publish it, all at once. Return False if another write came first or the
        job is gone. Raise ``JobTerminal`` (storing nothing) if the stored job has ended: a
        finished job never changes, whatever a caller computed. ``state.seq`` must be
        ``expected_seq + 1`` (``ValueError`` otherwise, before anything is stored)."""

    @abc.abstractmethod
    async def apply(
        self, job_id: str, update: ProgressUpdate, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        """Decide a progress report against the stored state and store the result, in one
        atomic step with no conflict to retry: ``model.apply_progress`` at ``now`` with
        ``inputs.weights``, then the ETA (``progress.estimate_eta`` with ``inputs.stats``);
        if it changed anything, store it, append it to the history and publish it. Raise
        ``JobNotFound``, ``JobTerminal`` or ``InvalidUpdate`` as the rules do. The caller
        validates ``update`` first (``model.validate_update``)."""

    async def apply_many(
        self, items: Sequence[tuple[str, ProgressUpdate, RuleInputs]], now: datetime
    ) -> list[Decided | OtherJob | PhasecastError]:
        """``apply`` for each ``(job_id, update, inputs)`` at ``now``, in the given order
        (reports of one job are applied in that order), each atomic on its own; one answer
        per item, in order, a ``PhasecastError`` returned in place of the one raised. This
        default applies them one after another; an engine overrides it to share round
        trips. The caller validates every update first."""
        results: list[Decided | OtherJob | PhasecastError] = []
        for job_id, update, inputs in items:
            try:
                results.append(await self.apply(job_id, update, now, inputs))
            except PhasecastError as exc:
                results.append(exc)
        return results

    async def apply_by_compare_and_set(
        self, job_id: str, update: ProgressUpdate, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        """``apply`` written with ``load`` and ``replace``: the rules in Python, retried
        until no other write comes between. The specification the engines' atomic steps
        are held to, and their fallback for a stored state they cannot handle."""
        while True:
            state = await self.load(job_id)
            if state is None:
                raise JobNotFound(job_id)
            if state.kind != inputs.kind or state.owner != inputs.owner:
                return OtherJob(state.kind, state.owner)
            outcome = apply_progress(state, update, now, inputs.weights)
            if not outcome.applied:
                return Decided(False, state.to_json())
            new = outcome.state
            new.eta_seconds = estimate_eta(new, now, inputs.stats, inputs.weights)
            state_json = new.to_json()
            if await self.replace(new, state.seq):
                return Decided(True, state_json)

    @abc.abstractmethod
    async def end(
        self, job_id: str, ending: Ending, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        """End a job in one atomic step: ``model.apply_terminal`` against the stored state,
        stored, appended and published. The same ending again is not applied; another
        ending of a finished job raises ``JobTerminal``."""

    async def end_by_compare_and_set(
        self, job_id: str, ending: Ending, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        """``end`` written with ``load`` and ``replace`` (see ``apply_by_compare_and_set``)."""
        while True:
            state = await self.load(job_id)
            if state is None:
                raise JobNotFound(job_id)
            if state.kind != inputs.kind or state.owner != inputs.owner:
                return OtherJob(state.kind, state.owner)
            outcome = apply_terminal(state, ending.phase, now, message=ending.message,
                                     error=ending.error)
            if not outcome.applied:
                return Decided(False, state.to_json())
            state_json = outcome.state.to_json()
            if await self.replace(outcome.state, state.seq):
                return Decided(True, state_json)

    @abc.abstractmethod
    async def list_jobs(
        self, owner: str | None, *, active_only: bool, limit: int
    ) -> list[JobState]:
        """Newest first. ``owner=None`` lists every owner's jobs."""

    @abc.abstractmethod
    async def history(self, job_id: str, *, limit: int) -> list[dict[str, Any]]:
        """The most recent ``limit`` changes, oldest first."""

    @abc.abstractmethod
    async def load_stats(self, kind: str) -> PhaseStats: ...

    @abc.abstractmethod
    async def record_durations(self, kind: str, durations: dict[Phase, float]) -> None:
        """Fold one finished job's phase durations into the learned typical durations."""


class ChangeFeed(abc.ABC):
    """Delivers every change stored for a listened job to one handler in this process, in
    seq order per job, each once while the feed stays up; after an outage it delivers the
    newest stored state of each listened job instead of the changes it missed."""

    _on_change: ChangeHandler | None = None

    def _emit(self, change: Change) -> None:
        if self._on_change is not None:
            self._on_change(change)

    @abc.abstractmethod
    async def listen(self, job_id: str) -> None:
        """Make sure changes of ``job_id`` reach ``on_change``, and return once they will.
        Raise ``EngineUnavailable`` if that cannot be made sure (the engine is not started,
        or its change feed is down and does not come back in time); the job is then not
        listened to, and a later call tries again."""

    async def unlisten(self, job_id: str) -> None:
        """Changes of ``job_id`` are no longer needed (the last local watcher left). A feed
        may go on delivering them; the handler ignores jobs it does not watch."""


class Engine(JobStore, ChangeFeed):
    """A store and its change feed, chosen by URL scheme (``engines.open_engine``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._on_change = None

    @abc.abstractmethod
    async def start(self, on_change: ChangeHandler | None = None) -> None:
        """Connect; from now on deliver changes of listened jobs to ``on_change`` (without a
        handler, the engine is a store only and ``listen`` is refused)."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``EngineUnavailable`` if the store cannot be reached."""

    # --- what plugins keep beside the job states (engines/extensions.py) -----------------

    def panel_records(self) -> PanelRecords:
        """The RunPod integration's panel records, kept in this engine's store."""
        raise ConfigurationError(f"the RunPod integration does not support {type(self).__name__}")

    def archive_outbox(self) -> ArchiveOutbox:
        """Archive records waiting for PostgreSQL, kept durably in this engine's store."""
        raise ConfigurationError(f"the PostgreSQL archive does not support {type(self).__name__}")

    async def ready(self) -> None:
        """Raise ``EngineUnavailable`` unless the store is reachable and the change feed
        is live (a watcher subscribing now would miss nothing). ``/readyz`` asks this."""
        await self.ping()
