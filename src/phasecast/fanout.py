"""Local fan-out: from one change feed to every watcher in this process.

Each connection owns one ``Mailbox``. A mailbox keeps at most one pending change per job and
replaces it when a newer one arrives (latest wins), so a watcher that cannot keep up costs a
bounded amount of memory and, once it reads again, gets the newest state. Nothing after a
terminal state exists, so the terminal state itself is never replaced and never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from phasecast.engines.base import Change, ChangeFeed
from phasecast.model import JobState

log = logging.getLogger("phasecast.fanout")

# Control messages (errors, acknowledgements) a connection may have queued at once; past
# this the oldest are dropped, since they describe requests the client has moved on from.
MAX_CONTROL_MESSAGES = 64


class Mailbox:
    """Latest-wins buffer of changes waiting to be written to one connection.

    Built for 10,000 of them per process: no ``asyncio.Event`` (its waiter deque costs
    memory per connection) and no ``asyncio.wait_for`` (a new task per wait); a waiting
    writer parks on one bare future that ``offer``/``say`` resolve. Control messages live in
    a short list that exists only while some are queued (a deque with a maxlen is ~600 bytes
    per connection, held for the connection's whole life).
    """

    __slots__ = ("_delivered", "_held", "_pending", "_waiter", "conflated", "control", "direct")

    def __init__(self) -> None:
        self._pending: dict[str, Change] = {}
        self._delivered: dict[str, int] = {}
        self._waiter: asyncio.Future[bool] | None = None
        # Jobs whose changes are kept back (latest wins) until ``release``: a subscription
        # that is not yet authorised must not leak a state to the socket.
        self._held: dict[str, Change | None] | None = None
        self.control: list[str] | None = None
        self.conflated = 0
        # Optional fast path, set by a connection that can write without a task hop: called
        # with a change when the writer is idle and nothing else is queued, it takes the
        # change over (writes it at once, or hands it to its writer) and returns True.
        self.direct: Callable[[Change], bool] | None = None

    def set_floor(self, job_id: str, seq: int) -> None:
        """The watcher already has everything up to ``seq`` of this job."""
        self._delivered[job_id] = max(seq, self._delivered.get(job_id, 0))

    def offer(self, change: Change) -> None:
        if change.seq <= self._delivered.get(change.job_id, 0):
            return
        held = self._held
        if held is not None and change.job_id in held:
            kept = held[change.job_id]
            if kept is None or kept.seq < change.seq:
                held[change.job_id] = change
            return
        if (
            self._waiter is not None
            and self.direct is not None
            and not self._pending
            and not self.control
            and self.direct(change)
        ):
            self._delivered[change.job_id] = change.seq
            return
        pending = self._pending.get(change.job_id)
        if pending is not None:
            if pending.seq >= change.seq:
                return
            self.conflated += 1
        self._pending[change.job_id] = change
        self._wake(True)

    def say(self, frame: str) -> None:
        control = self.control
        if control is None:
            self.control = [frame]
        else:
            if len(control) >= MAX_CONTROL_MESSAGES:
                del control[0]
            control.append(frame)
        self._wake(True)

    def take_control(self) -> list[str]:
        """Queued control frames, oldest first; the caller writes them out."""
        control = self.control
        if control is None:
            return []
        self.control = None
        return control

    def take(self) -> list[Change]:
        """Everything pending, marked as delivered; the caller writes it out."""
        if not self._pending:
            return []
        changes = list(self._pending.values())
        self._pending.clear()
        for change in changes:
            self._delivered[change.job_id] = change.seq
        return changes

    def forget(self, job_id: str) -> None:
        self._pending.pop(job_id, None)
        self._delivered.pop(job_id, None)
        if self._held is not None:
            self._held.pop(job_id, None)
            if not self._held:
                self._held = None

    def hold(self, job_id: str) -> None:
        """Keep this job's changes back (the newest only) until ``release``."""
        if self._held is None:
            self._held = {}
        self._held.setdefault(job_id, None)

    def release(self, job_id: str) -> None:
        """Deliver this job's changes from now on, starting with the newest one held."""
        if self._held is None or job_id not in self._held:
            return
        kept = self._held.pop(job_id)
        if not self._held:
            self._held = None
        if kept is not None:
            self.offer(kept)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending) or bool(self.control)

    def wake(self) -> None:
        """Wake the waiting writer even though nothing is queued (the direct path handed it
        work of its own)."""
        self._wake(True)

    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(value)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until something is pending; False if ``timeout`` passed first. One waiter at
        a time (the connection's single writer)."""
        if self.has_pending:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else loop.call_later(timeout, self._wake, False)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiter is waiter:
                self._waiter = None


@dataclass(slots=True)
class _JobWatchers:
    ready: asyncio.Future[None]
    mailboxes: set[Mailbox] = field(default_factory=set)
    # The newest change seen for this job since it has been listened to, and its parsed
    # state once someone asked for it: a new watcher of a job already watched here starts
    # from it instead of reading the store (a reconnect storm is mostly that).
    latest: Change | None = None
    latest_state: JobState | None = None


class Hub:
    """Which local mailboxes watch which job; tells the engine which jobs to listen to."""

    def __init__(self, feed: ChangeFeed) -> None:
        self._engine = feed
        self._jobs: dict[str, _JobWatchers] = {}
        self._background: set[asyncio.Task[None]] = set()

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
        if entry.latest is None or change.seq > entry.latest.seq:
            entry.latest, entry.latest_state = change, None
        for mailbox in entry.mailboxes:
            mailbox.offer(change)

    async def add(self, job_id: str, mailbox: Mailbox) -> None:
        """Returns once every later change of ``job_id`` is guaranteed to reach ``mailbox``:
        load the state after this, not before, and nothing falls in between."""
        entry = self._jobs.get(job_id)
        if entry is not None:
            entry.mailboxes.add(mailbox)
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

    def current(self, job_id: str) -> tuple[JobState, Change] | None:
        """The newest state of a watched job that this hub has seen, if any, with its
        encoded change. Only current once ``add`` has returned for this job: from then on
        every change reaches the hub."""
        entry = self._jobs.get(job_id)
        if entry is None or entry.latest is None or not entry.ready.done():
            return None
        if entry.latest_state is None:
            entry.latest_state = JobState.from_json(entry.latest.state_json)
        return entry.latest_state, entry.latest

    def note(self, state: JobState) -> Change:
        """Record a state read from the store for a watched job (if it is the newest seen);
        returns its encoded change."""
        change = Change.of(state)
        entry = self._jobs.get(state.job_id)
        if entry is not None and (entry.latest is None or state.seq > entry.latest.seq):
            entry.latest, entry.latest_state = change, state
        return change

    def remove(self, job_id: str, mailbox: Mailbox) -> None:
        """Synchronous so that it is safe in a ``finally`` of a cancelled task; the engine
        is told to stop listening in the background."""
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
