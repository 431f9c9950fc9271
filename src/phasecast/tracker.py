"""``ProgressTracker``: the service API, used in-process by generation code and by the server.

Every report and every ending is one atomic step of the engine (``Engine.apply`` and
``Engine.end``): the engine decides it with the rules of ``phasecast.model`` against the
stored state and stores the result, in one round trip with nothing to retry, so concurrent
writers, in this process or in others sharing a Redis, never overwrite each other. The
tracker brings what the rules need besides the stored state: the time, and the weights and
learned phase durations of the job's kind (it remembers each job's kind and owner).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from phasecast.engines.base import Decided, Ending, Engine, OtherJob, RuleInputs
from phasecast.errors import EngineUnavailable, JobExists, JobNotFound, PhasecastError
from phasecast.fanout import Hub, Mailbox
from phasecast.model import (
    JobError,
    JobState,
    Outcome,
    Phase,
    ProgressUpdate,
    StepStatus,
    format_time,
    new_epoch,
    new_job,
    new_job_id,
    phase_durations,
    utc_now,
    validate_job_error,
    validate_message,
    validate_update,
)
from phasecast.progress import PhaseStats, WeightTable, estimate_eta

log = logging.getLogger("phasecast.tracker")

MAX_WRITE_ATTEMPTS = 50
KNOWN_JOBS = 65536  # kind and owner of jobs seen lately: what a report is decided with
STATS_CACHE_SECONDS = 30.0


class Archive(Protocol):
    """Durable copy of job records (PostgreSQL). ``record`` must not block: delivery to
    watchers never waits for the archive."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def record(self, state: JobState) -> None: ...

    async def load(self, job_id: str) -> JobState | None: ...


Observer = Callable[[JobState], None]
UpdateCounter = Callable[[str], None]


class ProgressTracker:
    def __init__(
        self,
        engine: Engine,
        *,
        weights: WeightTable | None = None,
        archive: Archive | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.weights = weights or WeightTable()
        self.archive = archive
        # Engines that read many jobs in one round trip (Redis: a pipeline) offer
        # ``load_many``; the hub then batches the store reads of a reconnect storm.
        self.hub = Hub(engine, load=self.get, load_many=getattr(engine, "load_many", None))
        self._clock = clock
        # job id -> writers waiting for their turn (present while one is writing)
        self._locks: dict[str, list[asyncio.Future[None]]] = {}
        self._rule_inputs: dict[tuple[str, str], RuleInputs] = {}
        self._known: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._usual_kind = "comic"
        self._stats: dict[str, tuple[float, PhaseStats]] = {}
        self._observers: list[Observer] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.count_update: UpdateCounter = lambda result: None
        self._started = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.engine.start(self.hub.dispatch)
        if self.archive is not None:
            await self.archive.start()
        self._started = True

    async def stop(self) -> None:
        await self.hub.close()
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        if self.archive is not None:
            await self.archive.stop()
        await self.engine.stop()
        self._started = False

    async def __aenter__(self) -> ProgressTracker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def settled(self) -> None:
        """Wait for background work started so far (learning phase durations)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def observe(self, observer: Observer) -> None:
        """Call ``observer(state)`` after every change this process stores (not those made by
        other processes). It must return quickly; it runs on the write path."""
        self._observers.append(observer)

    # --- reads ---------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobState:
        state = await self.engine.load(job_id)
        if state is None and self.archive is not None:
            state = await self._restore(job_id)
        if state is None:
            raise JobNotFound(job_id)
        return state

    async def _restore(self, job_id: str) -> JobState | None:
        """Bring back a job the engine lost (TTL expired, Redis flushed or restarted empty)
        from the archive. The epoch changes, which tells watchers that history was lost;
        seq continues from the archived one, so it never goes down for anyone."""
        assert self.archive is not None
        archived = await self.archive.load(job_id)
        if archived is None:
            return None
        restored = archived.copy()
        restored.epoch = new_epoch()
        restored.seq = archived.seq + 1
        restored.updated_at = format_time(self._clock())
        try:
            await self.engine.insert(restored)
        except JobExists:
            # Another request (or instance) restored it first; theirs is the one to use.
            return await self.engine.load(job_id)
        log.warning("job restored from the archive with a new epoch",
                    extra={"job_id": job_id, "seq": restored.seq})
        self._remember(restored)
        self._after_write(restored, learn=False)
        return restored

    async def list(
        self, owner: str | None, *, active_only: bool = False, limit: int = 100
    ) -> builtins.list[JobState]:
        return await self.engine.list_jobs(owner, active_only=active_only, limit=limit)

    async def history(self, job_id: str, *, limit: int = 100) -> builtins.list[dict[str, Any]]:
        await self.get(job_id)
        return await self.engine.history(job_id, limit=limit)

    # --- writes --------------------------------------------------------------------------

    async def create(
        self,
        kind: str = "comic",
        *,
        owner: str,
        job_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> JobState:
        state = new_job(
            job_id=job_id or new_job_id(),
            owner=owner,
            kind=kind,
            metadata=metadata or {},
            now=self._clock(),
        )
        state.eta_seconds = estimate_eta(
            state, self._clock(), await self._phase_stats(kind), self.weights.for_kind(kind)
        )
        await self.engine.insert(state)
        self._remember(state)
        self._after_write(state)
        return state

    async def update(self, job_id: str, update: ProgressUpdate) -> Outcome:
        decided, state = await self._decide(job_id, update)
        if state is None:
            state = JobState.from_json(decided.state_json)
        return Outcome(decided.applied, state)

    async def update_json(self, job_id: str, update: ProgressUpdate) -> Decided:
        """``update``, answered with the stored state as JSON, parsed by nobody: for a
        transport that only passes the state on."""
        decided, _ = await self._decide(job_id, update)
        return decided

    async def update_many_json(
        self, reports: Sequence[tuple[str, ProgressUpdate]]
    ) -> builtins.list[Decided | PhasecastError]:
        """``update_json`` for each ``(job_id, update)``: one answer per report, in order,
        a ``PhasecastError`` returned (not raised) for a report refused or not stored.
        Reports of one job are applied in the order given, each atomically on its own; the
        valid ones go to the engine together (``Engine.apply_many``: one round trip on
        Redis)."""
        results: builtins.list[Decided | PhasecastError | None] = [None] * len(reports)
        todo: builtins.list[int] = []
        for i, (job_id, update) in enumerate(reports):
            try:
                validate_update(update)
            except PhasecastError as exc:
                self._rejected(job_id, exc)
                results[i] = exc
                continue
            todo.append(i)
        if todo:
            items = []
            for i in todo:
                job_id, update = reports[i]
                inputs = self._inputs_now(job_id) or await self._inputs(job_id)
                items.append((job_id, update, inputs))
            answers = await self.engine.apply_many(items, self._clock())
            # Decided again one by one (in order, after the rest): the reports of a job
            # asked with another kind or owner than its own, or not found while an
            # archive may bring it back. Neither stored anything.
            again: dict[str, builtins.list[int]] = {}
            for i, answer in zip(todo, answers, strict=True):
                job_id = reports[i][0]
                if job_id in again:
                    again[job_id].append(i)
                elif isinstance(answer, OtherJob):
                    self._note(job_id, answer.kind, answer.owner)
                    again[job_id] = [i]
                elif isinstance(answer, JobNotFound) and self.archive is not None:
                    again[job_id] = [i]
                elif isinstance(answer, PhasecastError):
                    if not isinstance(answer, EngineUnavailable | JobExists):
                        self._rejected(job_id, answer)
                    results[i] = answer
                else:
                    results[i] = answer
                    if not answer.applied:
                        self.count_update("ignored")
                        continue
                    self.count_update("applied")
                    if self._observers or self.archive is not None:
                        self._after_write(JobState.from_json(answer.state_json))
            for job_id, indices in again.items():
                for i in indices:
                    try:
                        results[i], _ = await self._decide(job_id, reports[i][1])
                    except PhasecastError as exc:
                        results[i] = exc
        done: builtins.list[Decided | PhasecastError] = []
        for result in results:
            assert result is not None
            done.append(result)
        return done

    async def _decide(
        self, job_id: str, change: ProgressUpdate | Ending
    ) -> tuple[Decided, JobState | None]:
        """One atomic step of the engine (``apply`` or ``end``), asked again only when it
        was asked with another kind or owner than the job's, or after a restore."""
        try:
            if isinstance(change, Ending):
                validate_message(change.message)
                if change.error is not None:
                    validate_job_error(change.error)
            else:
                validate_update(change)
        except PhasecastError as exc:
            self._rejected(job_id, exc)
            raise
        # One writer of a job at a time in this process, in the order they came: reports
        # of one job from one process are applied in the order they were made.
        waiting = self._locks.get(job_id)
        if waiting is None:
            self._locks[job_id] = []
        else:
            await self._wait_turn(job_id, waiting)
        try:
            return await self._decide_in_turn(job_id, change)
        finally:
            self._next_turn(job_id)

    async def _decide_in_turn(
        self, job_id: str, change: ProgressUpdate | Ending
    ) -> tuple[Decided, JobState | None]:
        ending = isinstance(change, Ending)
        for _ in range(MAX_WRITE_ATTEMPTS):
            inputs = self._inputs_now(job_id) or await self._inputs(job_id)
            try:
                if ending:
                    assert isinstance(change, Ending)
                    result = await self.engine.end(job_id, change, self._clock(), inputs)
                else:
                    assert isinstance(change, ProgressUpdate)
                    result = await self.engine.apply(job_id, change, self._clock(), inputs)
            except JobNotFound:
                if self.archive is not None and await self._restore(job_id) is not None:
                    continue
                raise
            except (EngineUnavailable, JobExists):
                raise
            except PhasecastError as exc:
                self._rejected(job_id, exc)
                raise
            if isinstance(result, OtherJob):
                # Decided with another kind's weights or owner: nothing happened; again.
                self._note(job_id, result.kind, result.owner)
                continue
            if not result.applied:
                self.count_update("ignored")
                return result, None
            self.count_update("applied")
            state = None
            if self._observers or self.archive is not None or ending:
                state = JobState.from_json(result.state_json)
                self._after_write(state)
            return result, state
        raise EngineUnavailable(
            f"job {job_id!r} changed its kind or owner {MAX_WRITE_ATTEMPTS} times while "
            "being updated; gave up"
        )

    def _inputs_now(self, job_id: str) -> RuleInputs | None:
        """What the job's next report is decided with, if known without waiting (the
        kind's learned durations are cached); the same object while nothing changed."""
        kind, owner = self._known.get(job_id) or (self._usual_kind, "")
        cached = self._stats.get(kind)
        if cached is None or cached[0] <= time.monotonic():
            return None
        weights = self.weights.for_kind(kind)
        inputs = self._rule_inputs.get((kind, owner))
        if inputs is None or inputs.weights is not weights or inputs.stats is not cached[1]:
            if len(self._rule_inputs) > KNOWN_JOBS:
                self._rule_inputs.clear()
            inputs = self._rule_inputs[(kind, owner)] = RuleInputs(kind, owner, weights, cached[1])
        return inputs

    async def _inputs(self, job_id: str) -> RuleInputs:
        kind, owner = self._known.get(job_id) or (self._usual_kind, "")
        return RuleInputs(kind, owner, self.weights.for_kind(kind), await self._phase_stats(kind))

    async def _wait_turn(self, job_id: str, waiting: builtins.list[asyncio.Future[None]]) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._next_turn(job_id)  # the turn came as this writer was cancelled: pass it on
            elif turn in waiting:
                waiting.remove(turn)
            raise

    def _next_turn(self, job_id: str) -> None:
        waiting = self._locks[job_id]
        while waiting:
            turn = waiting.pop(0)
            if not turn.done():
                turn.set_result(None)
                return
        del self._locks[job_id]

    def _rejected(self, job_id: str, exc: PhasecastError) -> None:
        self.count_update("rejected")
        log.info("update rejected", extra={"job_id": job_id, "reason": str(exc)})

    async def report(
        self,
        job_id: str,
        phase: Phase | str,
        phase_progress: float | None = None,
        message: str | None = None,
    ) -> Outcome:
        return await self.update(
            job_id, ProgressUpdate(Phase(phase), phase_progress=phase_progress, message=message)
        )

    async def step(
        self,
        job_id: str,
        phase: Phase | str,
        step: str,
        progress: float | None = None,
        *,
        status: StepStatus | None = None,
        steps_total: int | None = None,
        message: str | None = None,
    ) -> Outcome:
        return await self.update(
            job_id,
            ProgressUpdate(
                Phase(phase),
                step=step,
                step_progress=progress,
                step_status=status,
                steps_total=steps_total,
                message=message,
            ),
        )

    async def complete(self, job_id: str, message: str | None = None) -> Outcome:
        return await self._end(job_id, Ending(Phase.COMPLETE, message))

    async def fail(
        self, job_id: str, code: str, error_message: str, *, message: str | None = None
    ) -> Outcome:
        return await self._end(
            job_id, Ending(Phase.FAILED, message, JobError(code=code, message=error_message))
        )

    async def cancel(self, job_id: str, reason: str | None = None) -> Outcome:
        validate_message(reason, "reason")  # it becomes the message; errors name it as sent
        return await self._end(job_id, Ending(Phase.CANCELLED, reason))

    async def _end(self, job_id: str, ending: Ending) -> Outcome:
        decided, state = await self._decide(job_id, ending)
        if state is None:
            state = JobState.from_json(decided.state_json)
        return Outcome(decided.applied, state)

    def _remember(self, state: JobState) -> None:
        self._note(state.job_id, state.kind, state.owner)

    def _note(self, job_id: str, kind: str, owner: str) -> None:
        """Kind and owner never change: the next report of this job is decided with them."""
        self._known[job_id] = (kind, owner)
        self._known.move_to_end(job_id)
        self._usual_kind = kind
        if len(self._known) > KNOWN_JOBS:
            self._known.popitem(last=False)

    def _after_write(self, state: JobState, *, learn: bool = True) -> None:
        for observer in self._observers:
            try:
                observer(state)
            except Exception:
                log.exception("observer failed", extra={"job_id": state.job_id})
        if self.archive is not None:
            self.archive.record(state)
        if learn and state.phase is Phase.COMPLETE:
            self._spawn(self._learn(state))

    async def _learn(self, state: JobState) -> None:
        try:
            await self.engine.record_durations(state.kind, phase_durations(state))
        except EngineUnavailable as exc:
            log.warning("could not record phase durations: %s", exc)
        self._stats.pop(state.kind, None)

    async def _phase_stats(self, kind: str) -> PhaseStats:
        cached = self._stats.get(kind)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        stats = await self.engine.load_stats(kind)
        self._stats[kind] = (time.monotonic() + STATS_CACHE_SECONDS, stats)
        return stats

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- watching ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, since: int = 0) -> AsyncIterator[AsyncIterator[JobState]]:
        """``async with tracker.watch(job_id) as states: async for state in states: …``

        Yields the current state (unless its seq is not above ``since``), then every newer
        one, ending after the terminal state. A slow reader skips intermediate states and
        gets the newest; it never gets an older one after a newer one."""
        mailbox = Mailbox()
        subscribed = await self.hub.subscribe(job_id, mailbox, since=since)
        try:
            yield _drain(mailbox, ended=subscribed.ended)
        finally:
            self.hub.unsubscribe(job_id, mailbox)


async def _drain(mailbox: Mailbox, *, ended: bool) -> AsyncIterator[JobState]:
    while not ended:
        await mailbox.wait()
        for change in mailbox.take():
            yield JobState.from_json(change.state_json)
            if change.terminal:
                return
