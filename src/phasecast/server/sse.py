"""Server-sent events: the WebSocket's states for networks that block WebSockets.

Two routes share one stream class:

- ``GET /v1/jobs/{job_id}/events``: one job per stream, ``id:`` is the state's seq and epoch
  (``<seq>.<epoch>``).
- ``GET /v1/events?job=…&job=…`` or ``?follow=active``: many jobs on one stream (a browser
  has ~6 HTTP/1.1 connections per origin), ``id:`` is an opaque cursor
  (``server/sse_cursor.py``) that resumes every job of the stream.

A stream is a plain ASGI response (no generator, no task group). The request's own task
subscribes every job through ``Hub.subscribe`` before the response starts (so refusals of
the per-job route are ordinary JSON responses) and sends the head and the first events. Then:

- raw (``phasecast serve``, ``PHASECAST_SSE_TRANSPORT=raw``): the stream takes the
  connection over (``server/sse_transport.py``) and the request's task ends. The mailbox's
  ``wakeup`` writes whatever is queued straight to the socket, from the hub's dispatch, as
  one chunk of pre-encoded bytes; while the socket pushes back the mailbox conflates (latest
  wins) and drains on resume. One timer per stream sends heartbeats, ends it at the token's
  expiry and rescans for ``follow=active``. An idle stream costs no task and no frames.
- asgi (any other server, or ``PHASECAST_SSE_TRANSPORT=asgi``): the request's task writes
  whatever the mailbox holds through ``send``, one write per wake-up; a small task waits for
  the client to go away.

Either way a stream ends after the terminal state of every job of an explicit list (with
``event: end`` on the multiplexed route), and at the token's expiry (with
``event: expired``), so a client reconnects with a fresh token and its last event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import weakref
from collections.abc import Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import Response
from pydantic import WithJsonSchema
from starlette.types import Receive, Scope, Send

from phasecast.engines.base import Change
from phasecast.errors import EngineUnavailable, InvalidUpdate, PhasecastError
from phasecast.fanout import Mailbox
from phasecast.model import JOB_ID_PATTERN, JOB_ID_RULE, JobState, parse_time, validate_job_id
from phasecast.server import frames
from phasecast.server.auth import Forbidden, Principal
from phasecast.server.deps import Services, authenticate, services
from phasecast.server.logs import job_id_var
from phasecast.server.metrics import Metrics
from phasecast.server.openapi import ERROR_DESCRIPTIONS
from phasecast.server.sse_cursor import (
    CURSOR_PATTERN,
    MAX_MOVES,
    SEQ_RESUME_PATTERN,
    Cursor,
    Mark,
    Marks,
    Move,
    Moves,
    chunk_size,
    entry,
    job_key,
    parse_cursor,
    parse_event_id,
)
from phasecast.server.sse_transport import LAST_CHUNK, chunk, detacher
from phasecast.server.websocket import DeliveryMeter
from phasecast.tracker import ProgressTracker

router = APIRouter(prefix="/v1", tags=["streams"])
log = logging.getLogger("phasecast.sse")

HEARTBEAT = frames.SSE_HEARTBEAT
FOLLOW_SLACK_SECONDS = 5  # clock skew between instances that a follow watermark allows for

def _event_schema(event: str, data: dict[str, Any], *, with_id: bool) -> dict[str, Any]:
    """One kind of event, as schemathesis and other OpenAPI 3.1 tools read a
    ``text/event-stream`` response whose ``schema`` describes each event: ``data`` is the
    text of one JSON document (``contentSchema``), ``id`` the resume point."""
    properties: dict[str, Any] = {
        "event": {"const": event},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
    }
    if with_id:
        properties["id"] = {"type": "string"}
    return {
        "type": "object",
        "required": ["event", "data", *(["id"] if with_id else [])],
        "properties": properties,
    }


_CONTROL_DATA: dict[str, Any] = {
    "type": "object",
    "required": ["message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
}
_JOB_ERROR_DATA: dict[str, Any] = {
    "type": "object",
    "required": ["job_id", "code", "message"],
    "properties": {
        "job_id": {"type": "string"},
        "code": {"type": "string"},
        "message": {"type": "string"},
    },
}
_STATE_DATA: dict[str, Any] = {"$ref": "#/components/schemas/JobStateModel"}


def _stream_ok(*kinds: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "A stream of server-sent events (docs/protocol.md); the schema describes "
        "one event. Heartbeats are comments; the first chunk sets `retry:`.",
        "content": {"text/event-stream": {"schema": {"type": "object", "oneOf": list(kinds)}}},
    }


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Refusals are JSON (our error body), not events: stated per status, or FastAPI would
    give them the route's media type."""
    return {
        status: {
            "description": ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for status in statuses
    }


_EXPIRED_EVENT = _event_schema("expired", _CONTROL_DATA, with_id=False)
_NOTHING_LEFT: dict[str, Any] = {
    "description": "Resumed with nothing left to send: the client already has the terminal "
    "state of every job of the stream (an EventSource stops reconnecting on 204)"
}
_JOB_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _stream_ok(_event_schema("state", _STATE_DATA, with_id=True), _EXPIRED_EVENT),
    204: _NOTHING_LEFT,
    **_errors(401, 403, 404, 422, 503),
}
_EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _stream_ok(
        _event_schema("state", _STATE_DATA, with_id=True),
        _event_schema("error", _JOB_ERROR_DATA, with_id=False),
        _event_schema("end", _CONTROL_DATA, with_id=False),
        _EXPIRED_EVENT,
    ),
    204: _NOTHING_LEFT,
    **_errors(401, 403, 422, 503),
}

# What a resume point may be (sse_cursor.SEQ_RESUME_PATTERN), published in the schema and
# checked with the same pattern. Empty means "no resume point" (start from the current
# state), as if it were left out.
MAX_SEQ = 10**18 - 1  # a seq has at most 18 digits, as in an event id


def _anchored(pattern: re.Pattern[str]) -> str:
    """The schema's form of a pattern the server applies with ``fullmatch``, empty
    allowed (an empty resume point is none)."""
    return f"^(?:{pattern.pattern})?$" if not pattern.fullmatch("") else f"^(?:{pattern.pattern})$"


_SEQ_RESUME_DOC = (
    "the id of the last event received (a state's seq and epoch, `<seq>.<epoch>`, or its seq "
    "alone); empty means no resume point"
)
_CURSOR_DOC = (
    "the id of the last event received on this route, unchanged (an opaque cursor); "
    "empty means no resume point"
)


# --- wire bytes: server/frames.py encodes them, once per change where they are shared ------

_state_event = frames.sse_event
_state_body = frames.sse_state_body
_control_event = frames.sse_control


# --- the stream --------------------------------------------------------------------------


class EventStream(Response):
    """One SSE response. Built and subscribed by a route, then run by the ASGI server."""

    media_type = "text/event-stream"
    marks = Marks()  # the cursor's entry per job (multiplexed)
    created: dict[str, float] = {}  # follow: creation time of each job seen
    finished: dict[str, float] = {}  # follow: ended jobs, by creation time
    refused: set[str] = set()  # follow: jobs refused once, never retried
    arrivals: set[str] = set()  # follow: jobs found by the observer

    def __init__(
        self, found: Services, caller: Principal, *, multiplexed: bool, follow: bool = False
    ) -> None:
        self.services = found
        self.tracker: ProgressTracker = found.tracker
        self.caller = caller
        self.multiplexed = multiplexed
        self.follow = follow
        self.mailbox = Mailbox()
        self.meter = _sse_meter(found.metrics)  # one per app, looked up once per stream
        self.open: set[str] = set()  # jobs streaming now
        # Containers only some streams use are made only for them (10,000 idle streams of
        # a process each pay for what they hold); the class-level empty ones are never
        # written to: per-job streams keep no marks, only follow streams use the rest.
        if multiplexed:
            self.marks = Marks()
        if follow:
            self.created, self.finished = {}, {}
            self.refused, self.arrivals = set(), set()
        self.watermark = 0
        self.initial: list[bytes] = []
        self.gone = False
        # Direct mode (the connection taken over from uvicorn, server/sse_transport.py).
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.last_write = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] | None = None
        self.closed = False
        self.scanning = False
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- subscribing (register -> read -> authorise -> release) --------------------------

    async def subscribe(self, job_id: str, mark: Mark | None) -> bool:
        """Watch ``job_id`` from ``mark`` on. Returns False if the client already has the
        job's terminal state (nothing to send). Raises ``PhasecastError`` if the job cannot
        be watched (then nothing of it is left registered)."""
        self.open.add(job_id)
        try:
            subscribed = await self.tracker.hub.subscribe(
                job_id,
                self.mailbox,
                since=mark.seq if mark is not None else 0,
                epoch=(mark.epoch or None) if mark is not None else None,
                authorise=self.caller.require_read,
            )
        except BaseException:
            self.open.discard(job_id)
            raise
        state = subscribed.state
        if self.follow:
            self.finished.pop(job_id, None)
            self.created[job_id] = parse_time(state.created_at).timestamp()
        if subscribed.ended:
            self.open.discard(job_id)
            self._ended(job_id, state, subscribed.floor)
            return False
        if self.multiplexed:
            # The cursor names the job from now on: with the state the client already has
            # (a resume), or with nothing yet (b""). A job whose state the client has is not
            # sent again, so its mark must be in every id from the first one on. (A live
            # stream may have written a newer state during ``subscribe``: that one stays.)
            floor = subscribed.floor
            self.marks.setdefault(job_id, entry(job_id, state.epoch, floor).encode() if floor else b"")
        return True

    async def subscribe_all(self, wanted: dict[str, Mark | None]) -> None:
        """Subscribe several jobs at once; a job that cannot be watched becomes an error
        event (multiplexed) or the request's error (per-job)."""
        results = await asyncio.gather(
            *(self.subscribe(job_id, mark) for job_id, mark in wanted.items()),
            return_exceptions=True,
        )
        for job_id, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                if not self.multiplexed or not isinstance(result, PhasecastError):
                    self.release_all()
                    raise result
                self.refuse(job_id, result)

    def refuse(self, job_id: str, error: PhasecastError) -> None:
        if self.follow:
            self.refused.add(job_id)
        self.initial.append(
            _control_event("error", {"job_id": job_id, "code": error.code, "message": error.message})
        )

    def _release(self, job_id: str) -> None:
        self.open.discard(job_id)
        self.tracker.hub.unsubscribe(job_id, self.mailbox)

    def release_all(self) -> None:
        for job_id in list(self.open):
            self._release(job_id)

    def _ended(self, job_id: str, state: JobState | None, seq: int) -> None:
        """The client has this job's terminal state."""
        if not self.multiplexed:
            return
        if self.follow:
            created = self.created.pop(job_id, None)
            if created is None or created < self.watermark - FOLLOW_SLACK_SECONDS:
                self.marks.pop(job_id)  # older than any rescan looks: forget it
                return
            self.finished[job_id] = created
            if len(self.finished) > self.services.settings.max_subscriptions:
                # The cursor names at most as many ended jobs as open ones: past that the
                # oldest is forgotten (a resume within the rescan window may send it again).
                oldest = min(self.finished, key=self.finished.__getitem__)
                del self.finished[oldest]
                self.marks.pop(oldest)
        if state is not None:
            self.marks.set(job_id, entry(job_id, state.epoch, seq).encode())

    @property
    def nothing_to_send(self) -> bool:
        return not self.open and not self.initial and not self.follow

    # --- follow=active -------------------------------------------------------------------

    async def resume_marks(self, job_ids: list[str], cursor: Cursor) -> dict[str, Mark | None]:
        """Which state of each job the cursor says the client has (None: start from the
        current state). A version 2 cursor names a job by a key of its id and epoch, so the
        job's current epoch is needed to recognise it: ``Hub.read`` gives it from this
        process's hub when it has the job (a reconnect storm costs no reads) and otherwise
        reads the store, one read shared by the job's watchers reading at the same time.
        Reading the epoch first is safe: if it changes before the subscription reads the
        state, the hub sees another epoch and sends the full state."""
        if not cursor.keyed:
            return {job_id: cursor.marks.get(job_id) for job_id in job_ids}
        read = await asyncio.gather(
            *(self.tracker.hub.read(job_id) for job_id in job_ids), return_exceptions=True
        )
        epochs: dict[str, str] = {}
        for job_id, result in zip(job_ids, read, strict=True):
            if isinstance(result, tuple):
                epochs[job_id] = result[0].epoch
            elif not isinstance(result, PhasecastError):
                raise result
            # A job that cannot be read has no mark; subscribing says why (an error event).
        return _marks_by_key(cursor, epochs, job_ids)

    async def scan(self, cursor: Cursor | None = None) -> None:
        """Pick up the caller's jobs this stream does not have yet.

        The first scan (given the resumed cursor, possibly empty) takes the caller's active
        jobs and the jobs the cursor names (a version 2 cursor's keys are matched against
        the caller's active jobs and newest ``max_subscriptions`` jobs). Every scan after a
        watermark (the time of the previous scan, carried in the cursor) also takes the jobs
        created since then, which may have ended in between. Jobs that had already ended
        before the stream first looked are known, not sent: they were never active for this
        stream."""
        owner, limit = self.caller.sub, self.services.settings.max_subscriptions
        now = int(time.time())
        since = self.watermark - FOLLOW_SLACK_SECONDS if self.watermark else None
        self.watermark = now
        self.marks.set_watermark(now)
        wanted: dict[str, Mark | None] = {}
        listed: list[JobState] = []
        if cursor is not None:
            wanted.update(cursor.marks)
            active = await self.tracker.list(owner, active_only=True, limit=limit)
            listed = await self.tracker.list(owner, active_only=False, limit=limit)
            if cursor.keyed:
                epochs = {state.job_id: state.epoch for state in (*active, *listed)}
                named = _marks_by_key(cursor, epochs, list(epochs))
                wanted.update({job_id: mark for job_id, mark in named.items() if mark is not None})
            for state in active:
                wanted.setdefault(state.job_id, None)
        elif since is not None:
            listed = await self.tracker.list(owner, active_only=False, limit=limit)
        window = now - FOLLOW_SLACK_SECONDS if since is None else since
        if listed:
            for state in listed:
                created = parse_time(state.created_at).timestamp()
                if created < window or state.job_id in wanted:
                    continue
                if since is not None:
                    wanted[state.job_id] = None
                elif state.terminal:
                    self.finished[state.job_id] = created
                    self.marks.set(state.job_id, entry(state.job_id, state.epoch, state.seq).encode())
        if since is not None:
            for job_id, created in list(self.finished.items()):
                if created < since:
                    del self.finished[job_id]
                    self.marks.pop(job_id)
        await self._follow_jobs(wanted)

    async def _follow_jobs(self, wanted: dict[str, Mark | None]) -> None:
        limit = self.services.settings.max_subscriptions
        fresh: dict[str, Mark | None] = {}
        for job_id, mark in wanted.items():
            if job_id in self.open or job_id in self.finished or job_id in self.refused:
                continue
            if len(self.open) + len(fresh) >= limit:
                self.refuse(job_id, _TooMany(limit))
                continue
            fresh[job_id] = mark
        await self.subscribe_all(fresh)

    def notice(self, state: JobState) -> None:
        """Observer hook (this process stored ``state`` for the caller): a new job of the
        caller is picked up at once rather than at the next scan."""
        job_id = state.job_id
        if job_id in self.open or job_id in self.finished or job_id in self.refused:
            return
        self.arrivals.add(job_id)
        self.mailbox.wake()

    # --- writing -------------------------------------------------------------------------

    def _encode(self, change: Change, parts: list[bytes]) -> None:
        if not self.multiplexed:
            parts.append(_state_event(change))  # shared by every watcher of the job
            return
        parts += (_state_body(change), b"id: ", self._move(change)[1], b"\n\n")

    def _move(self, change: Change) -> Move:
        """Put ``change`` in this stream's cursor. Streams whose cursors were equal share
        the result (``sse_cursor.Moves``): the first one joins the new cursor, the others
        only look it up, so a delivery to a stream that is up to date with others costs
        what a per-job stream's does. The entries stay in the marks, so a stream that falls
        out of step joins its own. (``_direct`` does the same steps inline.)"""
        moves = _MOVES
        if moves.change is not change:
            moves.begin(change, frames.sse_cursor_entry(change), _state_body(change))
        marks = self.marks
        slot = marks.slots.get(change.job_id)
        if slot is None:  # a job the cursor has no place for yet
            marks.set(change.job_id, b"")
            slot = marks.slots[change.job_id]
        cursor = marks.cursor or marks.joined()
        entries = marks.entries
        old = entries[slot]
        entries[slot] = moves.entry
        move = moves.table.get(cursor)
        if move is None or move[0] != old:
            move = (old, b"".join(entries), None)
            moves.keep(cursor, move)
        marks.cursor = move[1]
        return move

    def _drain(self) -> list[bytes]:
        """Everything queued, as the byte strings to write one after the other."""
        parts = self.initial
        self.initial = []
        changes = self.mailbox.take()
        if changes:
            meter = self.meter
            for change in changes:
                if change.job_id not in self.open:
                    continue  # released while pending
                self._encode(change, parts)
                meter.sent(change)
                if change.terminal:
                    self._release(change.job_id)
                    self._ended(change.job_id, None, change.seq)
        return parts

    async def _hear_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        self.gone = True
        self.mailbox.wake()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.services.settings
        self.services.metrics.connections.labels("sse").inc()
        if self.follow:
            _follow_registry(self.tracker).add(self)
        detached = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            del self.raw_headers
            first = b"".join([f"retry: {settings.sse_retry_ms}\n\n".encode(), *self._drain()])
            await send({"type": "http.response.body", "body": first, "more_body": True})
            detach = detacher(scope) if settings.sse_transport == "raw" else None
            if detach is not None and (self.open or self.follow):
                transport = detach(self)
                if transport is not None:
                    detached = True
                    self._attach(transport)
                    return  # the stream lives on without this task
            listener = asyncio.get_running_loop().create_task(self._hear_disconnect(receive))
            try:
                await self._pump(send)
            finally:
                listener.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not detached:
                self._closed()

    def _closed(self) -> None:
        """Release everything the stream holds; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        self.transport = None
        self.mailbox.direct = self.mailbox.wakeup = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for task in self.tasks or ():
            task.cancel()
        if self.follow:
            _follow_registry(self.tracker).discard(self)
        self.release_all()
        metrics = self.services.metrics
        metrics.conflated.inc(self.mailbox.conflated)
        metrics.connections.labels("sse").dec()

    async def _pump(self, send: Send) -> None:
        interval = self.services.settings.ping_interval
        expires_at = self.caller.expires_at
        mailbox = self.mailbox
        now = time.time()
        next_ping = now + interval
        next_scan = now + interval if self.follow else float("inf")
        while not self.gone:
            if not self.open and not self.follow:
                if self.multiplexed:
                    await self._write(send, _END)
                return
            now = time.time()
            if now >= expires_at:
                await self._write(send, _EXPIRED)
                return
            deadline = min(next_ping, next_scan, expires_at)
            if not await mailbox.wait(max(0.0, deadline - now)):
                now = time.time()
                if now >= next_scan:
                    next_scan = now + interval
                    await self._scan_quietly()
                if now >= next_ping and not mailbox.has_pending and not self.initial:
                    await self._write(send, HEARTBEAT)
                    next_ping = time.time() + interval
            if self.gone:
                return
            if self.arrivals:
                arrivals = set(self.arrivals)
                self.arrivals.clear()
                await self._follow_jobs(dict.fromkeys(arrivals))
            parts = self._drain()
            if parts:
                await self._write(send, b"".join(parts))
                next_ping = time.time() + interval

    async def _scan_quietly(self) -> None:
        # The next scan tries again; the jobs already followed go on meanwhile.
        with contextlib.suppress(EngineUnavailable):
            await self.scan()

    async def _write(self, send: Send, body: bytes) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": True})

    # --- raw mode: bytes written to the transport from the hub's dispatch ----------------

    def _attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.last_write = time.monotonic()
        self.mailbox.wakeup = self._flush
        self.mailbox.direct = self._direct
        self._arm()
        self._flush()  # whatever arrived since the first write

    def _direct(self, change: Change) -> bool:
        """``Mailbox.direct``: nothing else is queued, so write ``change`` now (or return
        False to have it queued: the socket pushes back, or events must go out first)."""
        if self.transport is None or self.paused or self.initial or change.job_id not in self.open:
            return False
        transport = self.transport
        if self.multiplexed:
            # ``_move``, written out: this runs once per watcher of every change.
            moves = _MOVES
            if moves.change is not change:
                moves.begin(change, frames.sse_cursor_entry(change), _state_body(change))
            marks = self.marks
            slot = marks.slots.get(change.job_id)
            if slot is None:  # a job the cursor has no place for yet
                marks.set(change.job_id, b"")
                slot = marks.slots[change.job_id]
            before = marks.cursor or marks.joined()
            entries = marks.entries
            old = entries[slot]
            entries[slot] = moves.entry
            move = moves.table.get(before)
            if move is None or move[0] != old:
                after, data = b"".join(entries), None
            else:
                after, data = move[1], move[2]
            if data is None:
                # One chunk: the event, its id line carrying the cursor, the blank line;
                # made once per move, written by every stream that shares it. (Batching a
                # stream's events of one loop iteration into one write was measured dearer
                # in bench transports: the deferred write cost more than the rare
                # coalescing saved.)
                head = moves.head
                data = b"".join((chunk_size(len(head) + len(after) + 2), head, after, b"\n\n\r\n"))
                table = moves.table  # ``moves.keep``, written out
                if len(table) >= MAX_MOVES:
                    table.clear()
                table[before] = (old, after, data)
            marks.cursor = after
            transport.write(data)
        else:
            transport.write(frames.sse_event_chunk(change))  # the same bytes for every watcher
        self.last_write = time.monotonic()
        self.meter.sent(change)
        if change.terminal:
            # The mailbox marks the change delivered after this returns; leave the job then.
            asyncio.get_running_loop().call_soon(self._delivered_terminal, change.job_id, change.seq)
        return True

    def _delivered_terminal(self, job_id: str, seq: int) -> None:
        if job_id in self.open:
            self._release(job_id)
            self._ended(job_id, None, seq)
        if not self.open and not self.follow and self.transport is not None:
            self._finish(_END if self.multiplexed else b"")

    def _arm(self) -> None:
        """One timer per stream: the next heartbeat, follow scan or the token's expiry,
        whichever comes first. Writes do not touch it: a heartbeat only goes out after a
        whole interval without data."""
        interval = self.services.settings.ping_interval
        delay = min(
            max(0.0, self.last_write + interval - time.monotonic()),
            max(0.0, self.caller.expires_at - time.time()),
        )
        if self.follow:
            delay = min(delay, interval)
        self.timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        if time.time() >= self.caller.expires_at:
            self._finish(_EXPIRED)
            return
        if self.follow and not self.scanning:
            # One scan at a time: a slow store does not pile scans up.
            self.scanning = True
            self._spawn(self._scan_and_flush())
        interval = self.services.settings.ping_interval
        if not self.paused and time.monotonic() - self.last_write >= interval - 0.001:
            self._send(HEARTBEAT)
        self._arm()

    def _flush(self) -> None:
        """``Mailbox.wakeup``: write what is queued, now. Called from the hub's dispatch, so
        it never raises into it."""
        if self.transport is None or self.paused:
            return
        try:
            if self.arrivals:
                arrivals = set(self.arrivals)
                self.arrivals.clear()
                self._spawn(self._follow_and_flush(arrivals))
            parts = self._drain()
            if parts:
                self._send(*parts)
            if not self.open and not self.follow:
                self._finish(_END if self.multiplexed else b"")
        except Exception:
            log.exception("SSE stream failed; closing it")
            self._abort()

    def _send(self, *parts: bytes) -> None:
        """Write ``parts`` as one chunk of the response body, without joining them."""
        assert self.transport is not None
        size = sum(map(len, parts))
        self.transport.writelines((b"%x\r\n" % size, *parts, b"\r\n"))
        self.last_write = time.monotonic()

    def _finish(self, last: bytes) -> None:
        """End the response properly (an optional last event, then the last chunk) and
        close the connection."""
        transport = self.transport
        if transport is not None:
            transport.write((chunk(last) if last else b"") + LAST_CHUNK)
            transport.close()
        self._closed()

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.abort()
        self._closed()

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        tasks = self.tasks
        if tasks is None:
            tasks = self.tasks = set()
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _scan_and_flush(self) -> None:
        try:
            await self._scan_quietly()
        finally:
            self.scanning = False
        self._flush()

    async def _follow_and_flush(self, arrivals: set[str]) -> None:
        await self._follow_jobs(dict.fromkeys(arrivals))
        self._flush()

    # server/sse_transport.Sink: what the connection tells a detached stream

    def connection_lost(self) -> None:
        self._closed()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._flush()

    def shutdown(self) -> None:
        self._finish(b"")


_MOVES = Moves()  # the cursor moves of the change being delivered, shared by all streams
_END = _control_event("end", {"message": "every job of this stream has ended; close the EventSource"})
_EXPIRED = _control_event(
    "expired",
    {
        "code": "token_expired",
        "message": "the token has expired; reconnect with a fresh token and "
        "last_event_id set to the id of the last event received",
    },
)


def _marks_by_key(
    cursor: Cursor, epochs: dict[str, str], job_ids: list[str]
) -> dict[str, Mark | None]:
    """The marks of a cursor for ``job_ids``, given each job's current epoch. Two jobs with
    the same key (one chance in 2^48 per pair) both get none: sent again, never skipped."""
    keys: dict[str, list[str]] = {}
    for job_id, epoch in epochs.items():
        keys.setdefault(job_key(job_id, epoch), []).append(job_id)
    marks: dict[str, Mark | None] = dict.fromkeys(job_ids)
    for key, named in keys.items():
        seq = cursor.keyed.get(key)
        if seq is not None and len(named) == 1:
            marks[named[0]] = Mark(epochs[named[0]], seq)
    return marks


class _TooMany(PhasecastError):
    code = "too_many_subscriptions"

    def __init__(self, limit: int) -> None:
        super().__init__(f"a stream may watch {limit} jobs at once; this one was not added")


class _FollowRegistry:
    """The follow streams of one tracker, by owner; one observer for all of them."""

    def __init__(self, tracker: ProgressTracker) -> None:
        self.by_owner: dict[str, set[EventStream]] = {}
        tracker.observe(self.on_state)

    def add(self, stream: EventStream) -> None:
        self.by_owner.setdefault(stream.caller.sub, set()).add(stream)

    def discard(self, stream: EventStream) -> None:
        streams = self.by_owner.get(stream.caller.sub)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self.by_owner[stream.caller.sub]

    def on_state(self, state: JobState) -> None:
        streams = self.by_owner.get(state.owner)
        if streams:
            for stream in streams:
                stream.notice(state)


_REGISTRIES: weakref.WeakKeyDictionary[ProgressTracker, _FollowRegistry] = (
    weakref.WeakKeyDictionary()
)


_METERS: weakref.WeakKeyDictionary[Metrics, DeliveryMeter] = weakref.WeakKeyDictionary()


def _sse_meter(metrics: Metrics) -> DeliveryMeter:
    """Delivered SSE messages counted in batches, once per event-loop iteration, as the
    WebSocket transports do (two Prometheus updates per message cost more than the write)."""
    meter = _METERS.get(metrics)
    if meter is None:
        meter = _METERS[metrics] = DeliveryMeter(metrics, "sse")
    return meter


def _follow_registry(tracker: ProgressTracker) -> _FollowRegistry:
    registry = _REGISTRIES.get(tracker)
    if registry is None:
        registry = _REGISTRIES[tracker] = _FollowRegistry(tracker)
    return registry


# --- routes ------------------------------------------------------------------------------


def _seq_resume_point(
    header: str | None, query: str | None, since: int | None
) -> Mark | None:
    """Both resume points are checked (a malformed one is refused even when the other
    wins); ``Last-Event-ID`` wins over ``last_event_id``, which wins over ``since`` (a seq of
    an unknown epoch)."""
    found: Mark | None = None
    for name, raw in (("Last-Event-ID", header), ("last_event_id", query)):
        if raw is None:
            continue
        if not SEQ_RESUME_PATTERN.fullmatch(raw):
            raise InvalidUpdate(
                name, "must be the id of an event of this stream, unchanged: a state's seq "
                "and epoch (<seq>.<epoch>) or its seq alone (or empty for no resume point)"
            )
        if found is None:
            found = parse_event_id(raw)
    if found is None and since is not None:
        found = Mark("", since)
    return found


# Optional strings described as plain strings with the pattern the route checks itself (so
# a refusal says how to fix it); left out means no resume point.
_SeqResume = Annotated[
    str | None, WithJsonSchema({"type": "string", "pattern": _anchored(SEQ_RESUME_PATTERN)})
]
_CursorResume = Annotated[
    str | None, WithJsonSchema({"type": "string", "pattern": _anchored(CURSOR_PATTERN)})
]
_JobParam = Annotated[
    str,
    Path(description=JOB_ID_RULE, json_schema_extra={"pattern": JOB_ID_PATTERN.pattern}),
]


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventStream,
    status_code=200,
    responses=_JOB_STREAM_RESPONSES,
    summary="Stream one job's states as server-sent events",
)
async def job_events(
    job_id: _JobParam,
    request: Request,
    since: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="resume after this seq")] = None,
    last_event_id: Annotated[_SeqResume, Query(description=_SEQ_RESUME_DOC)] = None,
    last_event_id_header: Annotated[
        _SeqResume, Header(alias="Last-Event-ID", description=_SEQ_RESUME_DOC)
    ] = None,
) -> Response:
    job_id_var.set(job_id)
    validate_job_id(job_id)
    caller = authenticate(request, allow_query=True)
    floor = _seq_resume_point(last_event_id_header, last_event_id, since)
    stream = EventStream(services(request), caller, multiplexed=False)
    # Access is checked before the response starts, so refusals are ordinary JSON responses.
    await stream.subscribe_all({job_id: floor})
    if stream.nothing_to_send:
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    return stream


@router.get(
    "/events",
    response_class=EventStream,
    status_code=200,
    responses=_EVENTS_RESPONSES,
    summary="Stream many jobs' states on one connection (server-sent events)",
    description="Name the jobs with `job` (repeat it) or use `follow=active`: one of the two, "
    "not both (422 otherwise). docs/protocol.md describes the events and the cursor.",
)
async def events(
    request: Request,
    job: Annotated[
        list[str] | None,
        WithJsonSchema({"type": "array", "items": {"type": "string", "pattern": JOB_ID_PATTERN.pattern}}),
        Query(description="a job to watch (repeat for more); or use follow=active"),
    ] = None,
    follow: Annotated[
        Literal["active"] | None,
        Query(description="watch the caller's active jobs, and those it creates later"),
    ] = None,
    last_event_id: Annotated[_CursorResume, Query(description=_CURSOR_DOC)] = None,
    last_event_id_header: Annotated[
        _CursorResume, Header(alias="Last-Event-ID", description=_CURSOR_DOC)
    ] = None,
) -> Response:
    found = services(request)
    limit = found.settings.max_subscriptions
    wanted = list(dict.fromkeys(job or ()))
    if follow is None and not wanted:
        raise InvalidUpdate("job", "name at least one job (?job=<id>&job=<id>…) or use ?follow=active")
    if follow is not None and wanted:
        raise InvalidUpdate("follow", "use either ?job=… or ?follow=active, not both")
    if len(wanted) > limit:
        raise InvalidUpdate("job", f"a stream may watch at most {limit} jobs; open another stream")
    for job_id in wanted:
        validate_job_id(job_id, "job")
    caller = authenticate(request, allow_query=True)
    if not caller.can_watch:
        raise Forbidden("the token has no scope that allows watching jobs (jobs:read)")
    # Both are checked; the header wins. Empty means no resume point.
    cursors = [
        parse_cursor(raw, field=name, max_jobs=limit)
        for name, raw in (("Last-Event-ID", last_event_id_header), ("last_event_id", last_event_id))
        if raw
    ]
    cursor = cursors[0] if cursors else Cursor()
    stream = EventStream(found, caller, multiplexed=True, follow=follow is not None)
    try:
        if follow is None:
            await stream.subscribe_all(await stream.resume_marks(wanted, cursor))
        else:
            stream.watermark = cursor.watermark
            stream.marks.set_watermark(cursor.watermark)
            await stream.scan(cursor)
        # In one order, so streams of the same jobs hold equal cursors (and share moves).
        stream.marks.sort()
    except BaseException:
        stream.release_all()
        raise
    if stream.nothing_to_send:
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    return stream
