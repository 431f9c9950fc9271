"""Local fan-out: from one change feed to every watcher in this process.

Each watcher (a WebSocket connection, an SSE stream, an in-process ``tracker.watch``) owns
one ``Mailbox``, which may carry any number of jobs. A mailbox keeps at most one pending
change per job and replaces it when a newer one arrives (latest wins), so a watcher that
cannot keep up costs a bounded amount of memory and, once it reads again, gets the newest
state. Nothing after a terminal state exists, so the terminal state itself is never replaced
and never dropped.

Every watcher joins a job through ``Hub.subscribe``: the one place where the sequence
register -> read -> authorise -> release is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from phasecast.engines.base import Change, ChangeFeed
from phasecast.model import JobState

log = logging.getLogger("phasecast.fanout")

class Meter(Protocol):
    """A transport's delivery counter, as ``Hub.dispatch`` updates it per message written
    through a lane: one added to ``count``, and ``note(change)`` for a change it has not
    seen in its current batch (``change is not meter.last``)."""

    count: int
    last: Change | None

    def note(self, change: Change) -> None: ...


class _NoMeter:
    """The meter of a mailbox that never had a lane (nothing is counted through it)."""

    __slots__ = ("count", "last")

    def __init__(self) -> None:
        self.count = 0
        self.last: Change | None = None

    def note(self, change: Change) -> None:
        self.last = None


_NO_METER = _NoMeter()


def _no_lane_encoding(change: Change) -> bytes:
    raise RuntimeError("this mailbox has no lane: Mailbox.open_lane sets its encoder")


# Control messages (acknowledgements, errors, pings) a watcher may have waiting unread at
# once. They are never dropped: a client needs every acknowledgement to make sense of the
# stream. A client that keeps asking without reading the answers is past this bound, and
# ``Mailbox.say`` tells its transport to close the connection (``overloaded``).
MAX_CONTROL_MESSAGES = 256


class Mailbox:
    """Latest-wins buffer of changes waiting to be written to one watcher.

    Built for 10,000 of them per process: no ``asyncio.Event`` (its waiter deque costs
    memory per watcher) and no ``asyncio.wait_for`` (a new task per wait). A transport
    consumes a mailbox in one of two ways:

    - a task parks in ``wait()`` and then writes out ``take_control()`` and ``take()``;
    - or, with no task at all, the transport sets ``direct`` (called with a change when
      nothing is queued; it writes the change at once and returns True, or returns False to
      have it queued) and ``wakeup`` (called whenever something was queued), and drains the
      mailbox itself whenever it can write.

    A transport that writes bytes to a socket can also open a *lane*
    (``open_lane``): its write function, the encoder of its wire form and its delivery
    meter. While the lane is open and nothing is queued or held, ``Hub.dispatch`` writes
    a change's encoded bytes itself, with no call into the mailbox or the transport (the
    hot path of the fan-out: once per delivered message). ``lane`` is the write function
    while that holds and None otherwise; the mailbox keeps it so on every change of its
    state, the transport by calling ``open_lane(None)`` while it cannot write.

    Control messages live in a short list that exists only while some are queued.
    """

    __slots__ = (
        "_delivered", "_held", "_lane", "_pending", "_waiter", "conflated", "control", "direct",
        "encode", "lane", "last", "meter", "overloaded", "wakeup",
    )

    def __init__(self) -> None:
        self._pending: dict[str, Change] = {}
        self._delivered: dict[str, int] = {}
        self._waiter: asyncio.Future[bool] | None = None
        # Jobs whose changes are kept back (latest wins) until ``release``: a subscription
        # that is not yet authorised must not leak a state to the watcher.
        self._held: dict[str, Change | None] | None = None
        self.control: list[str] | None = None
        self.conflated = 0
        self.overloaded = False
        self.direct: Callable[[Change], bool] | None = None
        self.wakeup: Callable[[], None] | None = None
        # The lane (see the class docstring): the transport's write while it may be used
        # right now (``lane``), the same whatever the mailbox holds (``_lane``).
        self.lane: Callable[[bytes], object] | None = None
        self._lane: Callable[[bytes], object] | None = None
        self.encode: Callable[[Change], bytes] = _no_lane_encoding
        self.meter: Meter = _NO_METER
        # The newest state handed to the transport, on either path (for its keepalive).
        self.last: Change | None = None

    def open_lane(
        self,
        write: Callable[[bytes], object] | None,
        encode: Callable[[Change], bytes] | None = None,
        meter: Meter | None = None,
    ) -> None:
        """Let ``Hub.dispatch`` write ``encode(change)`` with ``write`` while nothing is
        queued or held here, counting each message in ``meter``; ``open_lane(None)``
        while the transport cannot take writes (paused, closing, closed). A terminal state
        always takes the ``direct`` path: its transport has to end the subscription."""
        if write is not None:
            if encode is not None:
                self.encode = encode
            if meter is not None:
                self.meter = meter
            if self.encode is _no_lane_encoding or self.meter is _NO_METER:
                raise ValueError("open_lane needs the encoder and the meter the first time")
        self._lane = write
        self._relane()

    def _relane(self) -> None:
        """``lane`` is the transport's write only while nothing is queued or held."""
        self.lane = (
            self._lane if self._held is None and not self._pending and not self.control else None
        )

    def set_floor(self, job_id: str, seq: int) -> None:
        """The watcher already has everything up to ``seq`` of this job."""
        self._delivered[job_id] = max(seq, self._delivered.get(job_id, 0))

    def offer(self, change: Change) -> None:
        # Once per watcher of every change: locals, and the direct write tried first.
        job_id = change.job_id
        seq = change.seq
        delivered = self._delivered
        if seq <= delivered.get(job_id, 0):
            return
        held = self._held
        if held is not None and job_id in held:
            kept = held[job_id]
            if kept is None or kept.seq < seq:
                held[job_id] = change
            return
        direct = self.direct
        if direct is not None and not self._pending and not self.control and direct(change):
            delivered[job_id] = seq
            self.last = change
            return
        pending = self._pending.get(job_id)
        if pending is not None:
            if pending.seq >= seq:
                return
            self.conflated += 1
        self._pending[job_id] = change
        self.lane = None
        self._wake()

    def say(self, frame: str) -> bool:
        """Queue a control message. Returns False (and sets ``overloaded``) once more than
        ``MAX_CONTROL_MESSAGES`` wait unread: the transport should close the connection."""
        control = self.control
        if control is None:
            self.control = [frame]
        else:
            control.append(frame)
            if len(control) > MAX_CONTROL_MESSAGES:
                self.overloaded = True
        self.lane = None
        self._wake()
        return not self.overloaded

    def take_control(self) -> list[str]:
        """Queued control frames, oldest first; the caller writes them out."""
        control = self.control
        if control is None:
            return []
        self.control = None
        self._relane()
        return control

    def take(self) -> list[Change]:
        """Everything pending, marked as delivered; the caller writes it out."""
        if not self._pending:
            return []
        changes = list(self._pending.values())
        self._pending.clear()
        for change in changes:
            self._delivered[change.job_id] = change.seq
        self._relane()
        return changes

    def forget(self, job_id: str) -> None:
        self._pending.pop(job_id, None)
        self._delivered.pop(job_id, None)
        if self._held is not None:
            self._held.pop(job_id, None)
            if not self._held:
                self._held = None
        self._relane()

    def hold(self, job_id: str) -> None:
        """Keep this job's changes back (the newest only) until ``release``."""
        if self._held is None:
            self._held = {}
        self._held.setdefault(job_id, None)
        self.lane = None

    def release(self, job_id: str) -> None:
        """Deliver this job's changes from now on, starting with the newest one held."""
        if self._held is None or job_id not in self._held:
            return
        kept = self._held.pop(job_id)
        if not self._held:
            self._held = None
        if kept is not None:
            self.offer(kept)
        self._relane()

    @property
    def has_pending(self) -> bool:
        return bool(self._pending) or bool(self.control)

    def wake(self) -> None:
        """Wake the consumer although nothing was queued (its transport has work of its own,
        such as closing)."""
        self._wake()

    def _wake(self) -> None:
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until something is pending; False if ``timeout`` passed first. One waiter at
        a time (the watcher's single writer)."""
        if self.has_pending:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else loop.call_later(timeout, self._wake_waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiter is waiter:
                self._waiter = None

    def _wake_waiter(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(False)


@dataclass(slots=True)
class _JobWatchers:
    ready: asyncio.Future[None]
    mailboxes: set[Mailbox] = field(default_factory=set)
    # The newest change seen for this job since it has been listened to, and its parsed
    # state once someone asked for it: a new watcher of a job already watched here starts
    # from it instead of reading the store (a reconnect storm is mostly that).
    latest: Change | None = None
    latest_state: JobState | None = None
    # The store read in flight for this job, if any: watchers arriving together (a
    # reconnect storm) share it instead of reading the same state once each.
    loading: asyncio.Future[JobState] | None = None


def _listening(entry: _JobWatchers) -> bool:
    """The engine confirmed that it listens to the job: later changes reach the hub."""
    ready = entry.ready
    return ready.done() and not ready.cancelled() and ready.exception() is None


Loader = Callable[[str], Awaitable[JobState]]
# Reads many jobs' states in one round trip (a Redis pipeline): each job's state, or None
# where the store has none (that job then goes through the ``Loader``, which restores it
# from the archive or raises ``JobNotFound``).
BatchLoader = Callable[[list[str]], Awaitable[list[JobState | None]]]
Authorise = Callable[[JobState], None]
# Store reads asked for in one turn of the event loop go out together, in slices this big.
MAX_LOAD_BATCH = 512


@dataclass(slots=True, frozen=True)
class Subscribed:
    """What ``Hub.subscribe`` found: the job's current state, the resume point it honoured
    (``floor``: the watcher had everything up to this seq; 0 for the full state), and whether
    the subscription already ended (the job is terminal and the watcher has its final
    state)."""

    state: JobState
    floor: int
    ended: bool


class Hub:
    """Which local mailboxes watch which job; tells the engine which jobs to listen to."""

    def __init__(self, feed: ChangeFeed, load: Loader, load_many: BatchLoader | None = None) -> None:
        self._engine = feed
        self._load = load
        self._load_many = load_many
        self._jobs: dict[str, _JobWatchers] = {}
        self._background: set[asyncio.Future[Any]] = set()
        # Store reads waiting for the end of this loop turn (``_load_soon``).
        self._to_load: dict[str, asyncio.Future[JobState]] = {}

    @property
    def watched_jobs(self) -> int:
        return len(self._jobs)

    @property
    def watchers(self) -> int:
        return sum(len(entry.mailboxes) for entry in self._jobs.values())

    def dispatch(self, change: Change) -> None:
        """Called by the engine for every change of a listened job (or of every job)."""
        entry = self._jobs.get(change.job_id)
        if entry is None:
            return
        seq = change.seq
        latest = entry.latest
        if latest is None or seq > latest.seq:
            entry.latest, entry.latest_state = change, None
        # A copy: delivering a terminal state ends subscriptions, which leave this set.
        mailboxes = tuple(entry.mailboxes)
        if change.terminal:
            for mailbox in mailboxes:
                mailbox.offer(change)
            return
        # The hot path, once per delivered message: a mailbox with an open lane gets the
        # encoded bytes written here (what ``offer`` and the transport's ``direct`` would
        # do, minus the calls and the checks its open lane already stands for). A mailbox
        # not subscribed to the job (no delivered seq: it left while this loop runs) or
        # that has this seq already is skipped, exactly as ``offer`` would skip it.
        job_id = change.job_id
        frame = b""
        encoded_by = None
        for mailbox in mailboxes:
            write = mailbox.lane
            if write is None:
                mailbox.offer(change)
                continue
            delivered = mailbox._delivered
            if seq <= delivered.get(job_id, seq):
                continue
            encode = mailbox.encode
            if encode is not encoded_by:
                frame = encode(change)
                encoded_by = encode
            write(frame)
            delivered[job_id] = seq
            mailbox.last = change
            meter = mailbox.meter
            meter.count += 1
            if meter.last is not change:
                meter.note(change)

    async def subscribe(
        self,
        job_id: str,
        mailbox: Mailbox,
        *,
        since: int = 0,
        epoch: str | None = None,
        authorise: Authorise | None = None,
    ) -> Subscribed:
        """Watch ``job_id`` through ``mailbox``; the only way any watcher joins a job.

        The sequence, in this order:

        1. register: the mailbox holds the job's changes back and joins the job's watchers;
           this returns once every later change is guaranteed to reach the mailbox;
        2. read: the current state, from this hub when it has seen the job's newest change
           (a reconnect storm then costs no store reads), else from the store;
        3. authorise: ``authorise(state)`` may refuse by raising (a ``PhasecastError`` such as
           ``Forbidden``); it runs before anything of the job reaches the mailbox, so whatever
           it queues with ``mailbox.say`` (an acknowledgement) precedes every state;
        4. release: the mailbox gets the current state, unless the watcher has it already,
           then every newer change.

        ``since`` is the last seq the watcher has of this job, ``epoch`` the epoch it was
        from (if it knows one). A resume point the server cannot honour, a ``since`` beyond
        the current seq or another epoch, is ignored: the watcher gets the full current state.
        A mailbox may carry any number of jobs; call ``subscribe`` once per job.

        If any step raises, the mailbox is unregistered again and the error propagates
        (``JobNotFound``, ``EngineUnavailable`` or whatever ``authorise`` raised). If the
        job already ended and the watcher has its terminal state, the subscription is
        released at once and the result says ``ended``. Otherwise the caller ends it with
        ``unsubscribe`` (also after delivering the terminal state).
        """
        mailbox.forget(job_id)
        mailbox.hold(job_id)
        try:
            await self._register(job_id, mailbox)
            state, change = await self.read(job_id)
            if since > state.seq or (epoch is not None and epoch != state.epoch):
                # The hub's newest may lag the store by a change in flight: ask the store
                # before deciding that the resume point cannot be honoured.
                stored = await self._load(job_id)
                if stored.seq > state.seq:
                    state, change = stored, self._remember(stored)
            if authorise is not None:
                authorise(state)
        except BaseException:
            self.unsubscribe(job_id, mailbox)
            raise
        floor = since
        if since > state.seq or (epoch is not None and epoch != state.epoch):
            floor = 0
        mailbox.set_floor(job_id, floor)
        if state.terminal and state.seq <= floor:
            self.unsubscribe(job_id, mailbox)
            return Subscribed(state, floor, ended=True)
        mailbox.release(job_id)
        mailbox.offer(change)
        return Subscribed(state, floor, ended=False)

    async def _register(self, job_id: str, mailbox: Mailbox) -> None:
        """Returns once every later change of ``job_id`` is guaranteed to reach ``mailbox``:
        load the state after this, not before, and nothing falls in between."""
        entry = self._jobs.get(job_id)
        if entry is not None:
            entry.mailboxes.add(mailbox)
            if not _listening(entry):  # (a reconnect storm: mostly listening already)
                await asyncio.shield(entry.ready)
            return
        entry = _JobWatchers(asyncio.get_running_loop().create_future(), {mailbox})
        self._jobs[job_id] = entry
        try:
            await self._engine.listen(job_id)
        except Exception as exc:
            # Not listened: forget the entry, so the next watcher tries again, and fail every
            # watcher that joined meanwhile as well.
            if self._jobs.get(job_id) is entry:
                del self._jobs[job_id]
            if not entry.ready.done():
                entry.ready.set_exception(exc)
                entry.ready.exception()  # retrieved: joiners re-raise it, nobody must
            raise
        finally:
            if not entry.ready.done():
                entry.ready.set_result(None)

    async def read(self, job_id: str) -> tuple[JobState, Change]:
        """The current state of a job this process watches, with its change: the newest the
        hub has seen once registration is complete, otherwise loaded from the store (and
        remembered, so the next watcher of the job is served without a read).

        Watchers of one job that need the store at the same time share one read. A change
        that arrives while the read is in flight reaches every registered mailbox (held
        until release) and the hub's newest; the answer is the newer of the read and that."""
        entry = self._jobs.get(job_id)
        if entry is None or not _listening(entry):
            state = await self._load(job_id)
            return state, self._remember(state)
        if entry.latest is not None:
            if entry.latest_state is None:
                entry.latest_state = JobState.from_json(entry.latest.state_json)
            return entry.latest_state, entry.latest
        loading = entry.loading
        if loading is None:
            loading = entry.loading = self._load_soon(job_id)
            loading.add_done_callback(lambda done: self._loaded(entry, done))
        state = await asyncio.shield(loading)
        latest = entry.latest
        if latest is None or state.seq > latest.seq:
            return state, self._remember(state)
        if latest.seq == state.seq:
            return state, latest  # remembered by the first reader of this load
        if entry.latest_state is None:
            entry.latest_state = JobState.from_json(latest.state_json)
        return entry.latest_state, latest

    def _load_soon(self, job_id: str) -> asyncio.Future[JobState]:
        """The state of ``job_id`` from the store. With a batch loader, the reads asked for
        in one turn of the event loop (a reconnect storm: the subscribe requests of every
        connection that spoke in that turn) go out in one round trip, not one each."""
        if self._load_many is None:
            return asyncio.ensure_future(self._load(job_id))
        loop = asyncio.get_running_loop()
        found = self._to_load.get(job_id)
        if found is not None:
            return found
        if not self._to_load:
            loop.call_soon(self._start_loads)
        future = self._to_load[job_id] = loop.create_future()
        return future

    def _start_loads(self) -> None:
        waiting, self._to_load = self._to_load, {}
        ids = list(waiting)
        for start in range(0, len(ids), MAX_LOAD_BATCH):
            part = {job_id: waiting[job_id] for job_id in ids[start : start + MAX_LOAD_BATCH]}
            task = asyncio.get_running_loop().create_task(self._load_batch(part))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _load_batch(self, waiting: dict[str, asyncio.Future[JobState]]) -> None:
        load_many = self._load_many
        assert load_many is not None
        try:
            states = await load_many(list(waiting))
        except asyncio.CancelledError:
            for future in waiting.values():
                future.cancel()
            raise
        except Exception as exc:
            for future in waiting.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for (job_id, future), state in zip(waiting.items(), states, strict=True):
            if state is None:
                # Not in the store: the single read decides (archive, or JobNotFound).
                single: asyncio.Future[JobState] = asyncio.ensure_future(self._load(job_id))
                self._background.add(single)
                single.add_done_callback(self._background.discard)
                single.add_done_callback(functools.partial(_settle, future))
            elif not future.done():
                future.set_result(state)

    @staticmethod
    def _loaded(entry: _JobWatchers, done: asyncio.Future[JobState]) -> None:
        if entry.loading is done:
            entry.loading = None
        if not done.cancelled():
            done.exception()  # retrieved: every reader that still waits re-raises it

    def _remember(self, state: JobState) -> Change:
        """A state read from the store: the job's newest known, if it is newer."""
        change = Change.of(state)
        entry = self._jobs.get(state.job_id)
        if entry is not None and (entry.latest is None or state.seq > entry.latest.seq):
            entry.latest, entry.latest_state = change, state
        return change

    def known(self, job_id: str) -> JobState | None:
        """The newest state of ``job_id`` this hub has seen, without reading the store."""
        entry = self._jobs.get(job_id)
        if entry is None or entry.latest is None:
            return None
        if entry.latest_state is None:
            entry.latest_state = JobState.from_json(entry.latest.state_json)
        return entry.latest_state

    def unsubscribe(self, job_id: str, mailbox: Mailbox) -> None:
        """Stop delivering ``job_id`` to ``mailbox``. Synchronous so that it is safe in a
        ``finally`` of a cancelled task; the engine is told to stop listening in the
        background once the job's last local watcher has left."""
        mailbox.forget(job_id)
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        entry.mailboxes.discard(mailbox)
        if entry.mailboxes:
            return
        del self._jobs[job_id]
        task = asyncio.get_running_loop().create_task(self._unlisten(job_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unlisten(self, job_id: str) -> None:
        if job_id in self._jobs:
            return  # a new watcher arrived meanwhile
        try:
            await self._engine.unlisten(job_id)
        except Exception:
            log.exception("engine failed to stop listening to job %s", job_id)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _settle(future: asyncio.Future[JobState], done: asyncio.Future[JobState]) -> None:
    """Give ``future`` the outcome of ``done``."""
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif (exc := done.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(done.result())
