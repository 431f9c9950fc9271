"""``/v1/ws``: one connection, many watched jobs.

Two tasks per connection: the endpoint's own task reads client messages; a writer task
drains the connection's mailbox. Only the writer ever sends, so frames never interleave, and
a client that stops reading blocks nothing but its own writer while its mailbox conflates to
the newest state.

Sized for 10,000 connections per process (see docs/benchmarks.md): no third task per
connection, pings from one timer per connection instead of a timeout on every wait, each
state frame encoded once per change (``Change.ws_frame``) and metric children looked up
once per connection rather than once per message.

Direct path: when the writer is parked with nothing queued, a change is written from the
dispatch itself (``Mailbox.direct``) by running the ASGI send to completion synchronously,
which it does whenever the socket accepts the bytes at once. That saves a task wake-up per
message per watcher. If the send has to wait (the client's buffer is full), the half-done
send is handed to the writer task, which finishes it before anything else, so there is
still exactly one writer and frames never interleave or reorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine, Generator
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from phasecast.engines.base import Change
from phasecast.errors import JobNotFound, PhasecastError
from phasecast.fanout import Mailbox
from phasecast.model import JOB_ID_PATTERN
from phasecast.server.auth import Principal, Unauthorized
from phasecast.server.deps import Services

log = logging.getLogger("phasecast.ws")

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_SERVICE_RESTART = 1012
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024

PING_FRAME = '{"type":"ping"}'
PONG_FRAME = '{"type":"pong"}'


def _frame(kind: str, job_id: str | None, **fields: Any) -> str:
    return json.dumps({"type": kind, "job_id": job_id, **fields}, separators=(",", ":"))


def _error(job_id: str | None, code: str, message: str) -> str:
    return _frame("error", job_id, code=code, message=message)


class Connection:
    __slots__ = (
        "_blocked",
        "_closing",
        "_failed",
        "_latency",
        "_messages",
        "_pinger",
        "hub",
        "jobs",
        "mailbox",
        "principal",
        "services",
        "ws",
    )

    def __init__(self, websocket: WebSocket, services: Services) -> None:
        self.ws = websocket
        self.services = services
        self.hub = services.tracker.hub
        self.mailbox = Mailbox()
        self.jobs: set[str] = set()
        self.principal: Principal | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._blocked: tuple[_Continue, Change] | None = None
        self._failed: Exception | None = None
        self._messages = services.metrics.messages.labels("websocket")
        self._latency = services.metrics.latency.labels("websocket")

    async def run(self) -> None:
        await self.ws.accept()
        metrics = self.services.metrics
        metrics.connections.labels("websocket").inc()
        writer: asyncio.Task[None] | None = None
        try:
            if not await self._authenticate():
                return
            writer = asyncio.create_task(self._write_forever())
            writer.add_done_callback(self._writer_ended)
            self.mailbox.direct = self._direct
            self._schedule_ping()
            try:
                await self._read_forever()
            except (WebSocketDisconnect, _Closed):
                pass
            except Exception:
                log.exception("websocket connection failed")
        finally:
            self.mailbox.direct = None
            if self._pinger is not None:
                self._pinger.cancel()
                self._pinger = None
            if writer is not None and not writer.done():
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            if self._blocked is not None:
                self._blocked[0].close()
                self._blocked = None
            for job_id in list(self.jobs):
                self.hub.remove(job_id, self.mailbox)
            self.jobs.clear()
            metrics.conflated.inc(self.mailbox.conflated)
            metrics.connections.labels("websocket").dec()

    def _writer_ended(self, writer: asyncio.Task[None]) -> None:
        """A writer only ends on its own when a send failed: the socket is gone (the reader
        hears the disconnect) or something unexpected broke, which is logged and the
        connection closed so the reader ends too."""
        if writer.cancelled():
            return
        exc = writer.exception()
        if exc is None or isinstance(exc, WebSocketDisconnect | _Closed | OSError):
            return
        if type(exc).__name__ == "ClientDisconnected":  # uvicorn's, raised by a send after close
            return
        log.error("websocket connection failed", exc_info=exc)
        closer = asyncio.get_running_loop().create_task(self._close(1011, "internal error"))
        self._closing = closer

    def _schedule_ping(self) -> None:
        """One timer per connection queues a ping every ``ping_interval``; the writer sends it
        like any control message, so the single-writer rule holds."""
        interval = self.services.settings.ping_interval

        def due() -> None:
            self.mailbox.say(PING_FRAME)
            self._pinger = loop.call_later(interval, due)

        loop = asyncio.get_running_loop()
        self._pinger = loop.call_later(interval, due)

    # --- authentication ------------------------------------------------------------------

    async def _authenticate(self) -> bool:
        token = self.ws.query_params.get("access_token")
        if token is None:
            try:
                raw = await asyncio.wait_for(
                    self.ws.receive_text(), self.services.settings.ws_auth_timeout
                )
            except TimeoutError:
                await self._close(CLOSE_UNAUTHORIZED, "no auth message received in time")
                return False
            except WebSocketDisconnect:
                return False
            message = _parse(raw)
            if not isinstance(message, dict) or message.get("op") != "auth":
                await self._close(
                    CLOSE_UNAUTHORIZED,
                    "authenticate first: ?access_token= or {\"op\":\"auth\",\"token\":…}",
                )
                return False
            token = message.get("token")
        return await self._accept_token(token)

    async def _accept_token(self, token: object) -> bool:
        if not isinstance(token, str) or not token:
            await self._close(CLOSE_UNAUTHORIZED, "the token is missing")
            return False
        try:
            principal = self.services.verifier.verify(token)
        except Unauthorized as exc:
            self.services.metrics.rejected_requests.labels("unauthorized").inc()
            log.info("websocket rejected: %s", exc.message)
            await self._close(CLOSE_UNAUTHORIZED, exc.message)
            return False
        if not principal.can_watch:
            log.info("websocket rejected: token has no watch scope", extra={"sub": principal.sub})
            await self._close(CLOSE_FORBIDDEN, "the token has no scope that allows watching jobs")
            return False
        if self.principal is not None and principal.sub != self.principal.sub:
            await self._close(CLOSE_FORBIDDEN, "a connection cannot switch to another user")
            return False
        self.principal = principal
        return True

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason[:120])

    # --- reading -------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        while True:
            raw = await self.ws.receive_text()
            if len(raw) > MAX_CLIENT_MESSAGE_BYTES:
                await self._close(1009, "message too large")
                raise _Closed
            message = _parse(raw)
            if not isinstance(message, dict):
                self.mailbox.say(_error(None, "invalid_message", "messages must be JSON objects"))
                continue
            op = message.get("op")
            if op == "subscribe":
                await self._subscribe(message)
            elif op == "unsubscribe":
                self._unsubscribe(message)
            elif op == "ping":
                self.mailbox.say(PONG_FRAME)
            elif op == "auth":
                if not await self._accept_token(message.get("token")):
                    raise _Closed
            else:
                self.mailbox.say(_error(
                    None, "invalid_message",
                    f"unknown op {op!r}; use subscribe, unsubscribe, auth or ping",
                ))

    async def _subscribe(self, message: dict[str, Any]) -> None:
        assert self.principal is not None
        job_id = message.get("job_id")
        since = message.get("since", 0)
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
            self.mailbox.say(_error(
                job_id if isinstance(job_id, str) else None, "invalid",
                "job_id must be a string of 1-128 letters, digits, '.', '_', ':' or '-'",
            ))
            return
        if since is None:
            since = 0
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            self.mailbox.say(_error(job_id, "invalid", "since must be a non-negative integer seq"))
            return
        if self.principal.expired:
            await self._close(CLOSE_UNAUTHORIZED, "the token has expired; reconnect with a new one")
            raise _Closed
        if job_id in self.jobs:
            # Re-subscribing means "send me what I am missing": honour the new since.
            self.mailbox.set_floor(job_id, since)
            self.mailbox.say(_frame("subscribed", job_id))
            return
        if len(self.jobs) >= self.services.settings.max_subscriptions:
            self.mailbox.say(_error(
                job_id, "too_many_subscriptions",
                f"a connection may watch {self.services.settings.max_subscriptions} jobs at once",
            ))
            return
        self.jobs.add(job_id)
        self.mailbox.set_floor(job_id, since)
        # Changes that arrive before the job is authorised are held back, so nothing of
        # another user's job reaches the socket and "subscribed" precedes every state.
        self.mailbox.hold(job_id)
        try:
            await self.hub.add(job_id, self.mailbox)
            state, change = await self.services.tracker.watched_state(job_id)
        except PhasecastError as exc:
            self._drop(job_id)
            log.info("subscribe refused: %s", exc.message, extra={"job_id": job_id})
            self.mailbox.say(_error(job_id, exc.code, exc.message))
            return
        if not self.principal.can_read(state):
            self._drop(job_id)
            log.info("subscribe refused: another user's job", extra={"job_id": job_id})
            self.mailbox.say(_error(job_id, "forbidden", f"job {job_id!r} belongs to another user"))
            return
        self.mailbox.say(_frame("subscribed", job_id))
        if state.terminal and state.seq <= since:
            self._drop(job_id)  # the client has the final state already
            return
        self.mailbox.release(job_id)
        self.mailbox.offer(change)

    def _unsubscribe(self, message: dict[str, Any]) -> None:
        job_id = message.get("job_id")
        if not isinstance(job_id, str) or job_id not in self.jobs:
            self.mailbox.say(_error(
                job_id if isinstance(job_id, str) else None, "not_subscribed",
                "this connection is not watching that job",
            ))
            return
        self._drop(job_id)
        self.mailbox.say(_frame("unsubscribed", job_id))

    def _drop(self, job_id: str) -> None:
        self.jobs.discard(job_id)
        self.hub.remove(job_id, self.mailbox)

    # --- writing -------------------------------------------------------------------------

    def _direct(self, change: Change) -> bool:
        """``Mailbox.direct``: write ``change`` now, from the dispatch (see the module doc)."""
        if change.job_id not in self.jobs:
            return True  # unsubscribed while in flight: consumed, as the writer would skip it
        sending = self.ws.send({"type": "websocket.send", "text": change.ws_frame()})
        try:
            waiting_on = sending.send(None)
        except StopIteration:
            self._sent(change, deferred=True)
            return True
        except Exception as exc:
            # The socket failed; the writer raises it, exactly as if it had sent itself.
            self._failed = exc
            self.mailbox.wake()
            return True
        self._blocked = (_Continue(sending, waiting_on), change)
        self.mailbox.wake()
        return True

    def _sent(self, change: Change, *, deferred: bool = False) -> None:
        self._messages.inc()
        self._latency.observe(max(0.0, time.time() - change.changed_at))
        if change.terminal:
            if deferred:
                # Called from inside the hub's dispatch loop over this job's watchers: leave
                # the job once that loop is done.
                asyncio.get_running_loop().call_soon(self._drop, change.job_id)
            else:
                self._drop(change.job_id)

    async def _write_forever(self) -> None:
        mailbox = self.mailbox
        jobs = self.jobs
        send = self.ws.send
        while True:
            if not mailbox.has_pending and self._blocked is None and self._failed is None:
                await mailbox.wait()
            if self._failed is not None:
                raise self._failed
            blocked = self._blocked
            if blocked is not None:
                await blocked[0]  # finish the direct path's send before anything else
                self._blocked = None
                self._sent(blocked[1])
            for frame in mailbox.take_control():
                await send({"type": "websocket.send", "text": frame})
            for change in mailbox.take():
                if change.job_id not in jobs:
                    continue  # unsubscribed while this was pending
                await send({"type": "websocket.send", "text": change.ws_frame()})
                self._sent(change)


class _Continue:
    """The rest of a send coroutine that the direct path started and that had to wait: the
    writer task awaits this to drive it to the end, passing through whatever it waits on."""

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting_on = self._coro, self._waiting_on
        while True:
            try:
                value = yield waiting_on
            except BaseException as exc:
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration:
                    # The send absorbed what interrupted us (a cancellation): pass it on
                    # rather than let the writer carry on as if nothing happened.
                    raise exc from None
            else:
                try:
                    waiting_on = coro.send(value)
                except StopIteration:
                    return


class _Closed(Exception):
    """The connection was closed on purpose; end quietly."""


def _parse(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


async def websocket_endpoint(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    await Connection(websocket, services).run()


__all__ = ["JobNotFound", "websocket_endpoint"]
