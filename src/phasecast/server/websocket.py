"""``/v1/ws``: one connection, many watched jobs (docs/protocol.md, WebSocket).

``Session`` is the protocol of ``/v1/ws`` and nothing else: it authenticates, subscribes
through ``Hub.subscribe`` (the one subscribe path), answers requests, pings, and closes the
connection at the token's expiry. It never touches a socket. What it has to send goes into
its ``Mailbox``; a transport pumps that mailbox to the wire:

- the raw transport (``server/rawws.py``, our uvicorn WebSocket protocol) writes each
  change's pre-encoded frame straight to the socket from the dispatch, with no task and no
  ASGI machinery per connection; it offers itself to the app through the ASGI scope extension
  ``phasecast.raw_websocket``;
- the ASGI transport below serves any other ASGI server: one task reads client messages,
  one writes the mailbox out through ``websocket.send``.

Both feed the session the same text messages and honour the same ``Link.close``, so both
behave the same (the end-to-end tests run over both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from phasecast.engines.base import Change
from phasecast.errors import InvalidUpdate, PhasecastError
from phasecast.fanout import Mailbox
from phasecast.model import JobState, loads_untrusted, validate_job_id
from phasecast.server import frames
from phasecast.server.auth import Forbidden, Principal, Unauthorized
from phasecast.server.deps import RepeatedToken, Services, query_token
from phasecast.server.metrics import Metrics

log = logging.getLogger("phasecast.ws")

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_OVERLOADED = 1008
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_SERVICE_RESTART = 1012
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024
MAX_UNANSWERED = 32  # answers waiting to be written before the ASGI reader stops reading
RAW_EXTENSION = "phasecast.raw_websocket"
WS_PATH = "/v1/ws"
# The app's lifespan state carries its ``Services`` under this key: the raw transport
# (server/rawws.py) adopts a ``/v1/ws`` upgrade from there at once, without the ASGI app.
SERVICES_STATE = "phasecast.services"
BINARY_REFUSED = "binary frames are not accepted; send JSON text messages"
OVERLOADED = "too many replies left unread; read the socket before sending more requests"


class DeliveryMeter:
    """Counts delivered state messages for the metrics, in batches. Per message a transport
    only adds one to ``count`` and, for a change it has not seen in this batch
    (``change is not meter.last``), calls ``note``; ``sent`` does both, for slower paths.
    Once per event-loop iteration the batch goes to Prometheus: the message counter by the
    exact count, the latency histogram once per change written in the batch (its watchers'
    writes happen within microseconds of each other). Two Prometheus updates per message
    cost more than the write itself."""

    __slots__ = ("_changes", "_latency", "_messages", "_scheduled", "connections", "count", "last")

    def __init__(self, metrics: Metrics, transport: str) -> None:
        # The open-connections gauge of this transport, looked up once (``labels`` costs a
        # lock and a dictionary look-up, once per connection in a reconnect storm).
        self.connections = metrics.connections.labels(transport)
        self._messages = metrics.messages.labels(transport)
        self._latency = metrics.latency.labels(transport)
        self.count = 0
        self.last: Change | None = None
        self._changes: dict[int, float] = {}
        self._scheduled = False

    def sent(self, change: Change) -> None:
        self.count += 1
        if change is not self.last:
            self.note(change)

    def note(self, change: Change) -> None:
        """``change`` is being written in this batch (its messages are counted apart)."""
        self.last = change
        self._changes[id(change)] = change.changed_at
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self.last = None
        count, self.count = self.count, 0
        if count:
            self._messages.inc(count)
        now = time.time()
        for changed_at in self._changes.values():
            self._latency.observe(max(0.0, now - changed_at))
        self._changes.clear()


_METERS: weakref.WeakKeyDictionary[Metrics, DeliveryMeter] = weakref.WeakKeyDictionary()


def websocket_meter(metrics: Metrics) -> DeliveryMeter:
    meter = _METERS.get(metrics)
    if meter is None:
        meter = _METERS[metrics] = DeliveryMeter(metrics, "websocket")
    return meter


class Link(Protocol):
    """What a session needs of its transport besides the mailbox."""

    def close(self, code: int, reason: str) -> None:
        """Send a Close frame with ``code`` after what is already written, then nothing."""

    def keepalive(self) -> None:
        """Called once per ping interval: check that the peer is still there."""

    def last_state_at(self) -> float | None:
        """When (``time.monotonic``) the newest state message went out on this connection,
        if the transport knows; None otherwise (the session then pings every interval)."""


class Session:
    """The ``/v1/ws`` protocol for one connection, independent of how bytes move."""

    __slots__ = (
        "_auth_timer",
        "_expiry",
        "_meter",
        "_pinger",
        "closed",
        "hub",
        "jobs",
        "link",
        "mailbox",
        "principal",
        "services",
    )

    def __init__(self, services: Services, link: Link) -> None:
        self.services = services
        self.link = link
        self.hub = services.tracker.hub
        self.mailbox = Mailbox()
        self.jobs: set[str] = set()
        self.principal: Principal | None = None
        self.closed = False
        self._pinger: asyncio.TimerHandle | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._meter = websocket_meter(services.metrics)

    # --- life ----------------------------------------------------------------------------

    def start(self, query_token: str | RepeatedToken | None) -> None:
        """The connection is open: authenticate by the URL's token, or wait for an ``auth``
        message; ping from then on."""
        self._meter.connections.inc()
        loop = asyncio.get_running_loop()
        if query_token is not None:
            if not self._accept_token(query_token):
                return
        else:
            self._auth_timer = loop.call_later(
                self.services.settings.ws_auth_timeout, self._auth_timed_out
            )
        self._pinger = loop.call_later(self.services.settings.ping_interval, self._ping)

    def end(self) -> None:
        """The connection is gone: release everything. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for timer in (self._pinger, self._auth_timer, self._expiry):
            if timer is not None:
                timer.cancel()
        self._pinger = self._auth_timer = self._expiry = None
        for job_id in self.jobs:
            self.hub.unsubscribe(job_id, self.mailbox)
        self.jobs.clear()
        metrics = self.services.metrics
        metrics.conflated.inc(self.mailbox.conflated)
        self._meter.connections.dec()

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.link.close(code, reason)

    def say(self, frame: str) -> None:
        """Queue a control message; a client that leaves too many unread is disconnected
        rather than losing acknowledgements."""
        if not self.mailbox.say(frame):
            log.info("websocket closed: client left %d replies unread", len(self.mailbox.control or ()))
            self.close(CLOSE_OVERLOADED, OVERLOADED)

    def _ping(self) -> None:
        if self.closed:
            return
        interval = self.services.settings.ping_interval
        # A state that went out less than an interval ago told the client as much as a ping
        # would: the ping waits until the connection has been quiet for a whole interval
        # (docs/protocol.md), which spares a write per watcher of every active job.
        sent_at = self.link.last_state_at()
        quiet = interval if sent_at is None else time.monotonic() - sent_at
        delay = interval
        if quiet < interval:
            delay = interval - max(0.0, quiet)
        else:
            queued = self.mailbox.control
            if self.principal is not None and not (queued and frames.PING_TEXT in queued):
                self.say(frames.PING_TEXT)  # one ping waiting is enough
        self.link.keepalive()
        self._pinger = asyncio.get_running_loop().call_later(delay, self._ping)

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if self.principal is None:
            self.close(CLOSE_UNAUTHORIZED, "no auth message received in time")

    def _expired(self) -> None:
        self._expiry = None
        log.info("websocket closed: token expired")
        self.close(CLOSE_UNAUTHORIZED, "token expired")

    # --- delivery bookkeeping (called by transports) --------------------------------------

    def sent(self, change: Change) -> None:
        """``change`` was written to the wire."""
        self._meter.sent(change)
        if change.terminal and change.job_id in self.jobs:
            # After the terminal state the subscription ends by itself.
            self.jobs.discard(change.job_id)
            self.hub.unsubscribe(change.job_id, self.mailbox)

    # --- authentication ------------------------------------------------------------------

    def _accept_token(self, token: object) -> bool:
        """Check ``token``; on success it becomes the connection's credential and
        ``authenticated`` is sent. Closes the connection and returns False otherwise."""
        if isinstance(token, RepeatedToken):
            self.services.metrics.rejected_requests.labels("unauthorized").inc()
            self.close(CLOSE_UNAUTHORIZED, token.message)
            return False
        if not isinstance(token, str) or not token:
            self.close(CLOSE_UNAUTHORIZED, "the token is missing")
            return False
        try:
            principal = self.services.verifier.verify(token)
        except Unauthorized as exc:
            self.services.metrics.rejected_requests.labels("unauthorized").inc()
            log.info("websocket rejected: %s", exc.message)
            self.close(CLOSE_UNAUTHORIZED, exc.message)
            return False
        if not principal.can_watch:
            log.info("websocket rejected: token has no watch scope", extra={"sub": principal.sub})
            self.close(CLOSE_FORBIDDEN, "the token has no scope that allows watching jobs")
            return False
        if self.principal is not None and principal.sub != self.principal.sub:
            self.close(CLOSE_FORBIDDEN, "a connection cannot switch to another user")
            return False
        self.principal = principal
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(max(0.0, principal.expires_at - time.time()), self._expired)
        self.say(_authenticated(principal.expires_at))
        self._drop_unreadable()
        return True

    def _drop_unreadable(self) -> None:
        """After a re-auth, end each subscription the new token may not read."""
        principal = self.principal
        assert principal is not None
        for job_id in list(self.jobs):
            known = self.hub.known(job_id)
            if known is not None and principal.can_read(known):
                continue
            if known is None and principal.is_worker:
                continue
            self._drop(job_id)
            self.say(frames.error(
                job_id, "forbidden",
                f"the new token may not read job {job_id!r}; its subscription ended",
            ))

    # --- requests ------------------------------------------------------------------------

    async def handle(self, raw: str) -> None:
        """One text message from the client."""
        if self.closed:
            return
        if len(raw) > MAX_CLIENT_MESSAGE_BYTES:
            self.close(CLOSE_TOO_BIG, "message too large")
            return
        message = _parse(raw)
        if self.principal is None:
            if not isinstance(message, dict) or message.get("op") != "auth":
                self.close(
                    CLOSE_UNAUTHORIZED,
                    'authenticate first: ?access_token= or {"op":"auth","token":…}',
                )
                return
            self._accept_token(message.get("token"))
            return
        if not isinstance(message, dict):
            self.say(frames.error(None, "invalid_message", "messages must be JSON objects"))
            return
        op = message.get("op")
        if op == "subscribe":
            await self._subscribe(message)
        elif op == "unsubscribe":
            self._unsubscribe(message)
        elif op == "ping":
            self.say(frames.PONG_TEXT)
        elif op == "auth":
            self._accept_token(message.get("token"))
        else:
            self.say(frames.error(
                None, "invalid_message",
                f"unknown op {repr(op)[:40]}; use subscribe, unsubscribe, auth or ping",
            ))

    async def _subscribe(self, message: dict[str, Any]) -> None:
        principal = self.principal
        assert principal is not None
        raw_id = message.get("job_id")
        since = message.get("since", 0)
        epoch = message.get("epoch")
        try:
            job_id = validate_job_id(raw_id)
        except InvalidUpdate as problem:
            self.say(frames.error(
                raw_id if isinstance(raw_id, str) and len(raw_id) <= 128 else None, "invalid",
                problem.message,
            ))
            return
        if since is None:
            since = 0
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            self.say(frames.error(job_id, "invalid", "since must be a non-negative integer seq"))
            return
        if epoch is not None and not isinstance(epoch, str):
            self.say(frames.error(job_id, "invalid", "epoch must be a string (the state's epoch)"))
            return
        if job_id in self.jobs:
            # Re-subscribing means "send me what I am missing": honour the new since.
            self.mailbox.set_floor(job_id, since)
            self.say(_subscribed(job_id))
            return
        if len(self.jobs) >= self.services.settings.max_subscriptions:
            self.say(frames.error(
                job_id, "too_many_subscriptions",
                f"a connection may watch {self.services.settings.max_subscriptions} jobs at once",
            ))
            return
        self.jobs.add(job_id)

        def authorise(state: JobState) -> None:
            current = self.principal
            if self.closed or current is None or job_id not in self.jobs:
                raise _Gone
            if not current.can_read(state):
                raise Forbidden(f"job {job_id!r} belongs to another user")
            self.say(_subscribed(job_id))

        try:
            subscribed = await self.hub.subscribe(
                job_id, self.mailbox, since=since, epoch=epoch, authorise=authorise
            )
        except _Gone:
            return
        except PhasecastError as exc:
            self.jobs.discard(job_id)
            if not self.closed:
                log.info("subscribe refused: %s", exc.message, extra={"job_id": job_id})
                self.say(frames.error(job_id, exc.code, exc.message))
            return
        if subscribed.ended:
            self.jobs.discard(job_id)  # the client has the final state already

    def _unsubscribe(self, message: dict[str, Any]) -> None:
        job_id = message.get("job_id")
        if not isinstance(job_id, str) or job_id not in self.jobs:
            self.say(frames.error(
                job_id if isinstance(job_id, str) and len(job_id) <= 128 else None,
                "not_subscribed", "this connection is not watching that job",
            ))
            return
        self._drop(job_id)
        self.say(frames.message("unsubscribed", job_id))

    def _drop(self, job_id: str) -> None:
        self.jobs.discard(job_id)
        self.hub.unsubscribe(job_id, self.mailbox)


# Acknowledgements are the same text for every watcher of a job (every token of one
# expiry): a reconnect storm sends 10,000 of them; each is encoded once. Bounded: cleared
# when full.
_ACKS_CACHED = 8192
_subscribed_texts: dict[str, str] = {}
_authenticated_texts: dict[float, str] = {}
_ack_frames: dict[str, bytes] = {}  # the complete WebSocket frame of each cached text


def _subscribed(job_id: str) -> str:
    text = _subscribed_texts.get(job_id)
    if text is None:
        if len(_subscribed_texts) >= _ACKS_CACHED:
            _subscribed_texts.clear()
            _ack_frames.clear()
        text = _subscribed_texts[job_id] = frames.message("subscribed", job_id)
        _ack_frames[text] = frames.ws_text_frame(text)
    return text


def _authenticated(expires_at: float) -> str:
    text = _authenticated_texts.get(expires_at)
    if text is None:
        if len(_authenticated_texts) >= _ACKS_CACHED:
            _authenticated_texts.clear()
            _ack_frames.clear()
        text = _authenticated_texts[expires_at] = frames.message(
            "authenticated", None, expires_at=expires_at
        )
        _ack_frames[text] = frames.ws_text_frame(text)
    return text


def control_frame(text: str) -> bytes:
    """The complete WebSocket text frame of a control message: an acknowledgement's frame
    made once for all the watchers that get that text, any other message's made now."""
    frame = _ack_frames.get(text)
    return frames.ws_text_frame(text) if frame is None else frame


class _Gone(Exception):
    """The subscription was withdrawn (unsubscribed, connection closed) while it was set up."""


def _parse(raw: str) -> Any:
    try:
        return loads_untrusted(raw)  # a key named twice is as unreadable as bad JSON
    except ValueError:
        return None


# --- the ASGI transport ----------------------------------------------------------------------


class AsgiConnection:
    """``/v1/ws`` over plain ASGI: one task reads, one writes the mailbox out."""

    __slots__ = ("_answered", "_closing", "session", "ws")

    def __init__(self, websocket: WebSocket, services: Services) -> None:
        self.ws = websocket
        self.session = Session(services, self)
        self._closing: tuple[int, str] | None = None
        self._answered: asyncio.Future[None] | None = None

    def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = (code, reason)
            self.session.mailbox.wake()  # the writer sends the Close
            self._wake_reader()

    def keepalive(self) -> None:
        """The ASGI server keeps the connection alive (uvicorn pings on its own)."""

    def last_state_at(self) -> float | None:
        """Not tracked on this path: the session pings every interval."""
        return None

    async def run(self) -> None:
        await self.ws.accept()
        session = self.session
        writer: asyncio.Task[None] | None = None
        try:
            session.start(query_token(self.ws.query_params.getlist("access_token")))
            writer = asyncio.create_task(self._write_forever())
            await self._read_forever()
        except Exception:
            log.exception("websocket connection failed")
            self.close(CLOSE_INTERNAL, "internal error")
        finally:
            session.end()
            if writer is not None:
                if self._closing is not None and not writer.done():
                    # Let the writer send the Close, bounded.
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.wait_for(asyncio.shield(writer), 5)
                if not writer.done():
                    writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer

    async def _read_forever(self) -> None:
        session = self.session
        while self._closing is None:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                log.info("websocket closed: binary frame")
                self.close(CLOSE_UNSUPPORTED_DATA, BINARY_REFUSED)
                return
            await session.handle(text)
            control = session.mailbox.control
            if control is not None and len(control) >= MAX_UNANSWERED and self._closing is None:
                # Read no more requests until the answers are written: a client that does
                # not read them gets TCP backpressure, and loses none.
                self._answered = asyncio.get_running_loop().create_future()
                await self._answered
        # Closing: wait for the client's Close reply (or the socket's end).
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while (await self.ws.receive())["type"] != "websocket.disconnect":
                pass

    async def _write_forever(self) -> None:
        session = self.session
        mailbox = session.mailbox
        send = self.ws.send
        jobs = session.jobs
        try:
            while True:
                if not mailbox.has_pending and self._closing is None:
                    await mailbox.wait()
                if self._closing is not None:
                    code, reason = self._closing
                    if self.ws.client_state is WebSocketState.CONNECTED:
                        await self.ws.close(code, reason[:120])
                    return
                for frame in mailbox.take_control():
                    await send({"type": "websocket.send", "text": frame})
                self._wake_reader()
                for change in mailbox.take():
                    if change.job_id not in jobs:
                        continue  # unsubscribed while this was pending
                    await send({"type": "websocket.send", "text": frames.ws_state_text(change)})
                    session.sent(change)
        except (WebSocketDisconnect, OSError, RuntimeError):
            return  # the socket is gone; the reader hears it too
        finally:
            self._wake_reader()

    def _wake_reader(self) -> None:
        answered = self._answered
        if answered is not None:
            self._answered = None
            if not answered.done():
                answered.set_result(None)


async def websocket_endpoint(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    raw = websocket.scope.get("extensions", {}).get(RAW_EXTENSION)
    if raw is not None:
        raw.adopt(services, query_token(websocket.query_params.getlist("access_token")))
        return
    await AsgiConnection(websocket, services).run()
