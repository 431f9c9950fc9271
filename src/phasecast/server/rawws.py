"""Our WebSocket protocol for uvicorn (its ``ws`` setting takes a protocol class).

uvicorn hands an upgrade request over to this class together with the socket. The
handshake and the parsing of client frames are done by the sans-I/O ``ServerProtocol`` of
the ``websockets`` package (RFC 6455: masking, RSV bits, opcodes, continuations, control
frames, close codes, message size checked from the frame header before any payload is
buffered). The app is then called once, through ASGI, with the extension
``phasecast.raw_websocket`` in its scope: the ``/v1/ws`` endpoint adopts the connection
(``adopt``), its ASGI call returns, and from then on the connection is this object, a
``Session`` and a ``Mailbox``. No task is parked per connection and no middleware frame is
held. A change reaches the socket as the complete frame bytes that ``server/frames.py``
encoded once for every watcher, written with ``transport.write`` while the transport
accepts writes; while it is paused (above its high-water mark) changes wait in the
mailbox, latest wins, and are written out on ``resume_writing``.

Routes that do not adopt the connection (or every route, with ``offer_raw = False``: the
"asgi" transport setting) get ordinary ASGI WebSocket semantics from the same class, so
both paths share one handshake and one frame parser.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, unquote

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.utils import accept_key, apply_mask

from phasecast.engines.base import Change
from phasecast.server import frames
from phasecast.server.deps import RepeatedToken, query_token
from phasecast.server.ingest import ReportProtocol
from phasecast.server.logs import _client_request_id, _next_request_id, request_id_var
from phasecast.server.websocket import (
    BINARY_REFUSED,
    CLOSE_INTERNAL,
    CLOSE_SERVICE_RESTART,
    CLOSE_UNSUPPORTED_DATA,
    RAW_EXTENSION,
    SERVICES_STATE,
    WS_PATH,
    DeliveryMeter,
    Session,
    control_frame,
    websocket_meter,
)

if TYPE_CHECKING:
    from phasecast.server.deps import Services

log = logging.getLogger("phasecast.ws")

CLOSE_TIMEOUT = 5.0  # after our Close, how long the client has to answer before we hang up
MAX_QUEUED_REQUESTS = 32  # client messages waiting for the session before reading pauses
KEEPALIVE_TIMEOUT = 60.0  # seconds without a byte from a client before it is presumed gone
PING_AFTER_SILENCE = KEEPALIVE_TIMEOUT / 2  # a client silent this long gets a Ping
CLOSE_FRAME_BYTE = 0x80 | frames.OP_CLOSE
_LONE_PONG_HEAD = bytes((0x80 | frames.OP_PONG, 0x80))  # final, no RSV bit, masked, empty

ASGIMessage = dict[str, Any]


class ClientGone(OSError):
    """Raised by the ASGI ``send`` once the connection is closed."""


class RawWebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection. See the module docstring."""

    offer_raw = True
    # The delivery meter, set by ``adopt`` (only adopted connections write states directly).
    _meter: DeliveryMeter

    __slots__ = (
        "_asgi_queue",
        "_close_timer",
        "_closed_frame_sent",
        "_conn",
        "_drained",
        "_fragment_text",
        "_fragments",
        "_heard_at",
        "_inbox",
        "_keepalive",
        "_meter",
        "_open",
        "_paused",
        "_reading_paused",
        "_refused",
        "_request",
        "_response",
        "_started",
        "_unsent",
        "_worker",
        "app",
        "app_state",
        "config",
        "server_state",
        "session",
        "transport",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.server_state = server_state
        self.app_state = app_state
        self._started = False
        # The sans-I/O protocol: made on the first bytes (``data_received``), except on a
        # plain ``/v1/ws`` upgrade, whose first client frames usually need none (``conn``).
        self._conn: ServerProtocol | None = None
        self._unsent: bytes | None = None  # the handshake response, until the session's first words join it
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self._open = False  # handshake done, no Close sent or received: frames may be written
        self._closed_frame_sent = False
        self._paused = False
        self._reading_paused = False
        self._heard_at = 0.0
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._inbox: list[str] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._request: Request | None = None
        self._response: Response | None = None
        self._refused = False  # answered 400 for an upgrade request the library could not parse
        self._asgi_queue: asyncio.Queue[ASGIMessage] | None = None
        self._fragments: list[bytes] | None = None
        self._fragment_text = False
        self._drained: asyncio.Future[None] | None = None

    @property
    def open(self) -> bool:
        """Handshake done, no Close sent or received: frames may be written."""
        return self._open

    @open.setter
    def open(self, value: bool) -> None:
        self._open = value
        self._update_lane()

    def _update_lane(self) -> None:
        """The session's mailbox may write states straight to the socket (``Mailbox.lane``)
        only while the connection is open and the socket not backed up."""
        session = self.session
        transport = self.transport
        if session is None or session.mailbox.direct is None or transport is None:
            return
        if self._open and not self._paused:
            session.mailbox.open_lane(transport.write, frames.ws_state_frame, self._meter)
        else:
            session.mailbox.open_lane(None)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        self.server_state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.server_state.connections.discard(self)
        for timer in (self._close_timer, self._keepalive):
            if timer is not None:
                timer.cancel()
        self._close_timer = self._keepalive = None
        if self.session is not None:
            self.session.end()
        if self._asgi_queue is not None:
            self._asgi_queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        self._wake_drained()

    def pause_writing(self) -> None:
        self._paused = True
        self._update_lane()
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drained()
        self._flush()
        self._update_lane()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read the client only while we can answer it: not before the app accepted, not
        while our writes are backed up (a client that does not read its answers gets TCP
        backpressure on its requests, and loses none of the answers), not while many of
        its requests wait for the session."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        inbox = self._inbox
        backlog = len(inbox) if inbox else 0
        pause = (
            self._response is not None
            or (self._paused and self.session is not None)
            or backlog >= MAX_QUEUED_REQUESTS
            or (self._reading_paused and backlog >= MAX_QUEUED_REQUESTS // 2)
        )
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _wake_drained(self) -> None:
        drained = self._drained
        if drained is not None:
            self._drained = None
            if not drained.done():
                drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._heard_at = asyncio.get_running_loop().time()
        if not self._started:
            # The upgrade request, as uvicorn re-serialised it from what httptools parsed.
            self._started = True
            if self.offer_raw and self._upgrade_fast(data):
                return
            self._conn = ServerProtocol(max_size=self.config.ws_max_size)
        elif self._conn is None and (
            (len(data) == 6 and data.startswith(_LONE_PONG_HEAD)) or self._lone_text_frame(data)
        ):
            # A lone empty masked Pong (a watcher answering our keepalive Ping, one every
            # 30 s or so per silent watcher) changes nothing but ``_heard_at``: taken here,
            # without the library's parser (and without making its object, ~25 µs, on the
            # first Pong of every connection).
            return
        conn = self.conn
        conn.receive_data(data)
        for event in conn.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Request):
                self._on_request(event)
        if conn.state is State.CONNECTING and conn.handshake_exc is not None and self._response is None \
                and self.session is None and not self._refused:
            self._refuse_unparsed(conn.handshake_exc)
        self._send_protocol_output()
        if conn.parser_exc is not None and conn.close_sent is not None:
            self.open = False
            if conn.close_sent.code != 1006:
                log.info(
                    "websocket closed %d: %s", conn.close_sent.code, conn.close_sent.reason
                )

    def eof_received(self) -> bool | None:
        if not self._started:
            self._started = True
            self._conn = ServerProtocol(max_size=self.config.ws_max_size)
        self.conn.receive_eof()
        self._send_protocol_output()
        return None

    @property
    def conn(self) -> ServerProtocol:
        """The sans-I/O protocol; on a connection upgraded by ``upgrade_plain`` made when
        first needed (a frame ``_lone_text_frame`` does not take, a Close, an error), open
        and at a frame boundary, as the library would have it at that point."""
        conn = self._conn
        if conn is None:
            conn = self._conn = ServerProtocol(state=State.OPEN, max_size=self.config.ws_max_size)
        return conn

    def _lone_text_frame(self, data: bytes) -> bool:
        """Take ``data`` if it is exactly one short text frame, final, masked, with no RSV
        bit: what a watcher sends after connecting (its subscribe request), read without
        making the library's protocol object (~25 µs: a generator, a logger, a UUID). False
        for anything else, which the library parses, and every byte after it too. Only while
        no library object exists: then no fragmented message can be in progress."""
        size = len(data) - 6
        if size < 0 or size > 125 or data[0] != 0x81 or data[1] != 0x80 | size:
            return False
        if size > self.config.ws_max_size:
            return False
        self._on_message(apply_mask(data[6:], data[2:6]), True)
        return True

    def shutdown(self) -> None:
        """uvicorn is stopping: tell the client to come back later."""
        if self.open:
            self.close(CLOSE_SERVICE_RESTART, "server restarting")
        elif self._response is None and self.transport is not None:
            self.transport.close()

    # --- writing ------------------------------------------------------------------------

    def _send_protocol_output(self) -> None:
        """Write what the sans-I/O protocol wants sent (handshake replies, pongs, Close
        frames); nothing but the end of the stream after our Close frame."""
        transport = self.transport
        if transport is None:
            return
        unsent = self._unsent
        if unsent is not None:
            self._unsent = None
            transport.write(unsent)
        for chunk in self.conn.data_to_send():
            if not chunk:
                transport.close()  # the protocol is done with the connection
                return
            if self._closed_frame_sent:
                continue
            transport.write(chunk)
            if chunk[0] == CLOSE_FRAME_BYTE:
                self._closed_frame_sent = True
                self.open = False

    def close(self, code: int, reason: str) -> None:
        """``Link.close``: a Close frame after what is already written, then nothing more;
        the connection ends when the client answers, or after ``CLOSE_TIMEOUT``."""
        if not self.open:
            return
        self.conn.send_close(code, reason[:120])
        self._send_protocol_output()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT, transport.close
            )

    def keepalive(self) -> None:
        """``Link.keepalive``, once per ping interval: a Ping, which any live client
        answers; a client that sent nothing, not even a Pong, for ``KEEPALIVE_TIMEOUT``
        seconds is gone (a half-open TCP connection), so hang up and release its
        subscriptions. A client that does not read is not judged: it cannot see our Pings,
        and that is what the mailbox is for (TCP finds a dead peer with unacknowledged
        data by itself)."""
        transport = self.transport
        if not self.open or transport is None or self._paused:
            return
        silent = asyncio.get_running_loop().time() - self._heard_at
        if silent > KEEPALIVE_TIMEOUT:
            log.info("websocket closed: nothing heard for %.0f s", KEEPALIVE_TIMEOUT)
            self.open = False
            transport.abort()
            return
        if silent >= PING_AFTER_SILENCE:
            # Ping, no payload: any Pong proves the client is there. Only once the client
            # has been silent for half the timeout: a Ping and its Pong are a write and a
            # read of their own per watcher, which a client heard from recently is spared.
            transport.write(b"\x89\x00")

    def _direct(self, change: Change) -> bool:
        """``Mailbox.direct``: write the change's frame now, unless the socket is backed up
        (then the mailbox keeps it, latest wins, until ``resume_writing``).

        The hot path of the fan-out is the mailbox's lane (``_update_lane``: the hub writes
        the frame itself); this is the path of a terminal state, and of a change arriving
        while the lane is shut (something queued or held): the frame from the change's
        cache (``frames.ws_state_frame``), the message counted in the batch meter inline,
        the session told of terminal states (which end the subscription)."""
        if self._paused or not self.open:
            return False
        session = self.session
        assert session is not None
        if change.job_id in session.jobs:
            wire = change.wire
            frame = None if wire is None else wire.get("ws_frame")
            if frame is None:
                frame = frames.ws_state_frame(change)
            transport = self.transport
            assert transport is not None
            transport.write(frame)
            if change.terminal:
                session.sent(change)
            else:
                meter = self._meter
                meter.count += 1
                if change is not meter.last:
                    meter.note(change)
        return True

    def _flush(self) -> None:
        """``Mailbox.wakeup`` and ``resume_writing``: write out whatever is queued."""
        session = self.session
        if self._paused or not self.open or session is None:
            return
        mailbox = session.mailbox
        transport = self.transport
        assert transport is not None
        out: list[bytes] = []
        if mailbox.control:
            for text in mailbox.take_control():
                if text is frames.PING_TEXT:
                    out.append(frames.PING_FRAME)
                elif text is frames.PONG_TEXT:
                    out.append(frames.PONG_FRAME)
                else:
                    out.append(control_frame(text))
        written: list[Change] = []
        if mailbox.has_pending:
            jobs = session.jobs
            for change in mailbox.take():
                if change.job_id in jobs:
                    out.append(frames.ws_state_frame(change))
                    written.append(change)
        if not out:
            return
        # One write (one system call, one segment) for everything queued.
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        for change in written:
            mailbox.last = change
            session.sent(change)

    def last_state_at(self) -> float | None:
        """``Link.last_state_at``: when the newest state written here went out
        (``time.monotonic``), or None if none has."""
        change = None if self.session is None else self.session.mailbox.last
        return None if change is None else frames.ws_state_sent_at(change)

    # --- reading ------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._on_message(bytes(frame.data), opcode is Opcode.TEXT)
            else:
                self._fragments = [bytes(frame.data)]
                self._fragment_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            # The sans-I/O protocol has checked the order and the total size already.
            fragments = self._fragments
            assert fragments is not None
            fragments.append(bytes(frame.data))
            if frame.fin:
                self._fragments = None
                self._on_message(b"".join(fragments), self._fragment_text)
        elif opcode is Opcode.CLOSE:
            self.open = False
        # Ping and Pong: the sans-I/O protocol answers pings itself.

    def _on_message(self, data: bytes, text: bool) -> None:
        if not self.open:
            return
        if not text:
            if self.session is not None:
                log.info("websocket closed: binary frame")
                self.close(CLOSE_UNSUPPORTED_DATA, BINARY_REFUSED)
            elif self._asgi_queue is not None:
                self._asgi_queue.put_nowait({"type": "websocket.receive", "bytes": data})
            return
        try:
            decoded = data.decode()
        except UnicodeDecodeError as exc:
            log.info("websocket closed: invalid UTF-8 in a text message")
            self.conn.fail(1007, f"invalid UTF-8 at position {exc.start}")
            self._send_protocol_output()
            return
        if self.session is not None:
            inbox = self._inbox
            if inbox is None:
                inbox = self._inbox = []
            inbox.append(decoded)
            if self._worker is None:
                self._worker = asyncio.get_running_loop().create_task(self._work())
            if len(inbox) >= MAX_QUEUED_REQUESTS:
                self._update_reading()
        elif self._asgi_queue is not None:
            self._asgi_queue.put_nowait({"type": "websocket.receive", "text": decoded})

    async def _work(self) -> None:
        """Hand client messages to the session in order. Exists only while some wait."""
        session = self.session
        assert session is not None
        mailbox = session.mailbox
        inbox = self._inbox
        try:
            while inbox:
                # What a request makes the session send (``subscribed`` and then the job's
                # state) leaves in one write once the request is handled, not piece by
                # piece: one segment and one wake-up of the client per subscribe.
                mailbox.wakeup = None
                try:
                    await session.handle(inbox.pop(0))
                except Exception:
                    log.exception("websocket request failed")
                    self.close(CLOSE_INTERNAL, "internal error")
                    return
                finally:
                    mailbox.wakeup = self._flush
                    if mailbox.has_pending:
                        self._flush()
                if self._reading_paused:
                    self._update_reading()
        finally:
            self._worker = None

    # --- the handshake, through the ASGI app ---------------------------------------------

    def _on_request(self, request: Request) -> None:
        conn = self.conn
        if len(request.headers.get_all("Host")) != 1:
            # RFC 6455 4.1 and 4.2.1 (and RFC 9112 3.2): the opening handshake carries
            # exactly one Host; the library does not check it.
            self._reply(conn.reject(HTTPStatus.BAD_REQUEST, HOST_REQUIRED))
            return
        version = request.headers.get_all("Sec-WebSocket-Version")
        if version != ["13"]:
            response = conn.reject(HTTPStatus.UPGRADE_REQUIRED, "Only WebSocket version 13 is supported\n")
            response.headers["Sec-WebSocket-Version"] = "13"
            self._reply(response)
            return
        response = conn.accept(request)
        if response.status_code != 101:
            self._reply(response)
            return
        raw_path, _, query = request.path.partition("?")
        if self.offer_raw:
            services = self.app_state.get(SERVICES_STATE)
            if services is not None and unquote(raw_path) == WS_PATH:
                conn.send_response(response)
                sent_id = next(
                    (v for k, v in request.headers.raw_items() if k.lower() == "x-request-id"), None
                )
                self._upgrade_directly(services, sent_id, query, b"".join(conn.data_to_send()))
                return
        self._request = request
        self._response = response
        assert self.transport is not None
        server = self.transport.get_extra_info("sockname")
        client = self.transport.get_extra_info("peername")
        extensions: dict[str, Any] = {"websocket.http.response": {}}
        if self.offer_raw:
            extensions[RAW_EXTENSION] = self
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if self.transport.get_extra_info("sslcontext") else "ws",
            "server": tuple(server[:2]) if server else None,
            "client": tuple(client[:2]) if client else None,
            "root_path": self.config.root_path,
            "path": self.config.root_path + unquote(raw_path),
            "raw_path": raw_path.encode("ascii"),
            "query_string": query.encode("ascii"),
            "headers": [
                (key.lower().encode("latin-1"), value.encode("latin-1"))
                for key, value in request.headers.raw_items()
            ],
            "subprotocols": [],
            "state": self.app_state.copy(),
            "extensions": extensions,
        }
        self._asgi_queue = asyncio.Queue()
        self._asgi_queue.put_nowait({"type": "websocket.connect"})
        self._update_reading()  # nothing to read until the app accepted
        task = asyncio.get_running_loop().create_task(self._run_asgi(scope))
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)

    def _upgrade_fast(self, data: bytes) -> bool:
        """A ``/v1/ws`` upgrade in the plain form WebSocket clients send, answered here:
        the websockets library's handshake (request parser, checks, response) cost about
        100 µs per connection, a sixth of a reconnecting watcher's server CPU; this costs
        about 15 (both measured on this machine). Anything else, including every request
        the library would refuse, goes to the library (False)."""
        services = self.app_state.get(SERVICES_STATE)
        if services is None:
            return False
        found = plain_ws_upgrade(data)
        if found is None:
            return False
        self.upgrade_plain(services, found)
        return True

    def upgrade_plain(self, services: Services, found: PlainUpgrade) -> None:
        """Answer a plain ``/v1/ws`` upgrade (``plain_ws_upgrade``) and start the session;
        also called by ``UpgradingHttpProtocol`` on a connection's first bytes."""
        self._started = True
        self._heard_at = asyncio.get_running_loop().time()
        key, sent_id, query = found
        self._upgrade_directly(services, sent_id, query, handshake_response(key))

    def _upgrade_directly(
        self, services: Services, sent_id: str | None, query: str, handshake: bytes
    ) -> None:
        """``/v1/ws``: adopted at the upgrade. The route's ASGI call would only carry the
        request through the HTTP middleware and the router to ``adopt``; in a reconnect storm
        that walk cost about a quarter of the server's CPU per connection. What the
        middleware does for a WebSocket is done here: the request id (``X-Request-ID`` if
        sane) is set for whatever the set-up logs."""
        context = request_id_var.set(_request_id(sent_id))
        try:
            self._start_session(services, _query_token(query), handshake)
        except Exception:
            log.exception("websocket set-up failed")
            if self.open:
                self.close(CLOSE_INTERNAL, "internal error")
            elif self.transport is not None:
                self.transport.close()
        finally:
            request_id_var.reset(context)

    def _refuse_unparsed(self, exc: Exception) -> None:
        """The library could not parse the upgrade request (a body, chunked encoding, a
        malformed line): it only ends the stream. The client gets a 400 saying why first,
        as for every other request the server refuses."""
        self._refused = True
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        text = (f"Failed to open a WebSocket connection: {exc}{cause}. An upgrade request is a GET "
                "with no body.\n").encode("utf-8", "replace")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain; "
                b"charset=utf-8\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
            )

    def _reply(self, response: Response) -> None:
        """Answer the upgrade request with an HTTP response and hang up."""
        self.conn.send_response(response)
        self._send_protocol_output()
        if self.transport is not None:
            self.transport.close()

    async def _run_asgi(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._asgi_receive, self._asgi_send)
        except Exception:
            log.exception("websocket handshake failed in the application")
            if self._response is not None and self.transport is not None:
                self._reply(self.conn.reject(500, "Internal Server Error\n"))
                return
        if self.session is not None:
            return  # adopted: the connection lives on without this task
        if self._response is not None:
            log.error("the application returned without accepting the WebSocket")
            self._reply(self.conn.reject(500, "Internal Server Error\n"))
        elif self.open:
            self.close(1000, "")

    def adopt(self, services: Services, query_token: str | RepeatedToken | None) -> None:
        """Called by the ``/v1/ws`` endpoint: accept, and serve the connection from here on
        without ASGI."""
        response = self._response
        assert response is not None
        self._response = self._request = None
        self.conn.send_response(response)
        self._start_session(services, query_token, b"".join(self.conn.data_to_send()))

    def _start_session(
        self, services: Services, query_token: str | RepeatedToken | None, handshake: bytes
    ) -> None:
        """Open the connection as a ``Session``. The handshake response and what the session
        says first (``authenticated``) leave in one write: one segment, one wake-up of the
        client, instead of two."""
        transport = self.transport
        assert transport is not None
        self._asgi_queue = None
        session = self.session = Session(services, self)
        self._meter = websocket_meter(services.metrics)
        mailbox = session.mailbox
        self.open = not transport.is_closing()
        self._unsent = handshake  # written first by whatever writes next (a Close)
        try:
            session.start(query_token)
        finally:
            out = [] if self._unsent is None else [self._unsent]
            self._unsent = None
            if self.open and mailbox.control:
                out.extend(control_frame(text) for text in mailbox.take_control())
            if out and not transport.is_closing():
                transport.write(b"".join(out))
            mailbox.direct = self._direct
            mailbox.wakeup = self._flush
            self._update_lane()
        self._update_reading()

    def _accept(self, headers: list[tuple[bytes, bytes]]) -> None:
        response = self._response
        assert response is not None
        assert self.transport is not None
        self._response = self._request = None
        for name, value in headers:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        self.conn.send_response(response)
        self._send_protocol_output()
        self.open = not self.transport.is_closing()
        self._update_reading()

    # --- plain ASGI, for routes that do not adopt the connection -------------------------

    async def _asgi_receive(self) -> ASGIMessage:
        queue = self._asgi_queue
        if queue is None:
            return {"type": "websocket.disconnect", "code": 1006}
        return await queue.get()

    async def _asgi_send(self, message: ASGIMessage) -> None:
        kind = message["type"]
        if self._response is not None:  # handshake not answered yet
            if kind == "websocket.accept":
                headers = list(message.get("headers", []))
                if message.get("subprotocol"):
                    headers.append((b"sec-websocket-protocol", message["subprotocol"].encode()))
                self._accept(headers)
                self._schedule_keepalive()
            elif kind == "websocket.close":
                self._response = None
                self._reply(self.conn.reject(HTTPStatus.FORBIDDEN, ""))
            elif kind == "websocket.http.response.start":
                given = Headers(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
                )
                given.setdefault("Date", email.utils.formatdate(usegmt=True))
                status = int(message["status"])
                self._response = Response(status, HTTPStatus(status).phrase, given, b"")
            elif kind == "websocket.http.response.body" and self._response.status_code != 101:
                denial = self._response
                denial.body = bytes(denial.body or b"") + bytes(message.get("body", b""))
                if not message.get("more_body", False):
                    self._response = None
                    denial.headers.setdefault("Content-Length", str(len(denial.body)))
                    denial.headers.setdefault("Connection", "close")
                    self._reply(denial)
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} before the handshake")
            return
        if kind == "websocket.http.response.body":
            raise RuntimeError("the handshake was already answered")
        if not self.open:
            raise ClientGone("the WebSocket is closed")
        await self._writable()
        if kind == "websocket.send":
            text = message.get("text")
            if text is not None:
                self.conn.send_text(text.encode())
            else:
                self.conn.send_binary(message.get("bytes") or b"")
            self._send_protocol_output()
        elif kind == "websocket.close":
            self.close(int(message.get("code", 1000)), message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _schedule_keepalive(self) -> None:
        """Plain ASGI: no session pings for us, so the protocol checks the peer itself, every
        ``ws_ping_interval`` seconds."""
        interval = self.config.ws_ping_interval
        if interval:
            self._keepalive = asyncio.get_running_loop().call_later(interval, self._keep_alive)

    def _keep_alive(self) -> None:
        self.keepalive()
        if self.open:
            self._schedule_keepalive()

    async def _writable(self) -> None:
        """Wait while the transport is paused (plain ASGI sends only)."""
        while self._paused and self.open:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained


class UpgradingHttpProtocol(ReportProtocol):
    """uvicorn's HTTP protocol as Phasecast serves it (``ReportProtocol``: the thin path for
    progress reports, the SSE seam), which hands a connection whose first bytes are a plain
    ``/v1/ws`` upgrade (``plain_ws_upgrade``) to the WebSocket protocol at once. uvicorn
    would parse the request with httptools, build an HTTP scope of it, write the request out
    again and give that to the WebSocket protocol, which parses it once more: in a reconnect
    storm, work done 10,000 times for nothing. Every other request, a plain upgrade split
    over several reads included, takes uvicorn's way."""

    _spoken = False  # bytes have come on this connection

    def data_received(self, data: bytes) -> None:
        if not self._spoken:
            self._spoken = True
            if data.startswith(_WS_REQUEST_START):
                # A client that sends frames without waiting for the 101 (RFC 6455 says it
                # must wait; some do not) has them in the same read: they are the new
                # protocol's, not lost.
                end = data.find(b"\r\n\r\n") + 4
                head, rest = (data, b"") if end in (3, len(data)) else (data[:end], data[end:])
                if self._hand_over(head, rest):
                    return
        super().data_received(data)

    def handle_websocket_upgrade(self) -> None:
        """uvicorn's upgrade, for requests that are not plain (``_hand_over``): it writes
        the request out again as HTTP/1.1 whatever the client sent, so the version is
        checked here. RFC 6455 4.1: the opening handshake is HTTP/1.1 or higher."""
        if self.scope.get("http_version", "1.1") == "1.0":
            self.connections.discard(self)
            self._answer_and_close(400, "bad_request", HTTP_1_1_REQUIRED)
            return
        super().handle_websocket_upgrade()

    def _hand_over(self, data: bytes, rest: bytes = b"") -> bool:
        ws_class = self.ws_protocol_class
        services = self.app_state.get(SERVICES_STATE)
        if services is None or not (
            isinstance(ws_class, type) and issubclass(ws_class, RawWebSocketProtocol) and ws_class.offer_raw
        ):
            return False
        found = plain_ws_upgrade(data)
        if found is None:
            return False
        # What uvicorn does on an upgrade, without the request in between.
        self.connections.discard(self)
        protocol = ws_class(config=self.config, server_state=self.server_state, app_state=self.app_state)
        protocol.connection_made(self.transport)
        protocol.upgrade_plain(services, found)
        self.transport.set_protocol(protocol)
        if rest:
            protocol.data_received(rest)
        # The httptools parser holds this object's callbacks: a reference cycle the
        # collector would have to find, once per connection. Broken, this object goes now.
        self.parser = None  # type: ignore[assignment]
        return True


class AsgiWebSocketProtocol(RawWebSocketProtocol):
    """The same protocol without the raw extension: ``/v1/ws`` runs through plain ASGI
    (what it does on any other ASGI server). Chosen by ``PHASECAST_WS_TRANSPORT=asgi``."""

    offer_raw = False


# --- the plain upgrade request (see ``RawWebSocketProtocol._upgrade_fast``) --------------------

HOST_REQUIRED = "A WebSocket upgrade request needs exactly one Host header (RFC 6455 section 4.1)\n"
HTTP_1_1_REQUIRED = "a WebSocket upgrade needs HTTP/1.1: send 'GET /v1/ws HTTP/1.1' (RFC 6455 section 4.1)"

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_KEY = re.compile(rb"[A-Za-z0-9+/]{22}==")  # base64 of 16 bytes
# The whole request at once in the shape clients send: each header line a token, a colon
# and printable ASCII (no tab). A request that matches needs no check of its lines one by
# one (about half of ``plain_upgrade``'s time); one that does not is checked line by line.
_PLAIN_HEAD = re.compile(
    rb"GET [\x21-\x7e]+ HTTP/1\.1(?:\r\n[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[\x20-\x7e]*)*\r\n\r\n"
)
_MAX_HEAD_BYTES = 8192  # the library's limit per line; here for the whole request
_MAX_HEADERS = 128  # the library's limit
_date_cache: tuple[int, bytes] = (0, b"")


def plain_upgrade(data: bytes) -> tuple[str, str, str | None] | None:
    """``(target, Sec-WebSocket-Key, X-Request-ID)`` of a WebSocket upgrade request in its
    plain form: ``GET <target> HTTP/1.1``, printable ASCII header lines, exactly one
    ``Host``, ``Upgrade: websocket``, ``Sec-WebSocket-Version: 13`` and a well-formed key, a
    ``Connection`` list naming ``upgrade``, at most one ``Origin``, no
    ``Sec-WebSocket-Protocol`` (we offer none, but the library parses it), no body. Every
    such request is one the websockets library accepts, with the same response. None for
    anything else: the library then decides (and refuses what it must, as it must)."""
    if len(data) > _MAX_HEAD_BYTES or not data.endswith(b"\r\n\r\n"):
        return None
    lines = data[:-4].split(b"\r\n")
    if len(lines) > _MAX_HEADERS + 1:
        return None
    checked = _PLAIN_HEAD.fullmatch(data) is not None
    request_line = lines[0].split(b" ")
    if not checked and (
        len(request_line) != 3
        or request_line[0] != b"GET"
        or request_line[2] != b"HTTP/1.1"
        or not _PRINTABLE.fullmatch(request_line[1])
    ):
        return None
    key: bytes | None = None
    version: bytes | None = None
    upgrade: bytes | None = None
    connection_upgrade = False
    origins = 0
    hosts = 0
    sent_id: str | None = None
    for line in lines[1:]:
        raw_name, colon, raw_value = line.partition(b":")
        value = raw_value.strip(b" \t")
        if not checked and (
            not colon or not _TOKEN.fullmatch(raw_name) or not _PRINTABLE.fullmatch(value)
        ):
            return None
        name = raw_name.lower()
        if name == b"sec-websocket-key":
            if key is not None:
                return None
            key = value
        elif name == b"sec-websocket-version":
            if version is not None:
                return None
            version = value
        elif name == b"upgrade":
            if upgrade is not None:
                return None
            upgrade = value
        elif name == b"connection":
            for option in value.split(b","):
                option = option.strip(b" \t")
                if not _TOKEN.fullmatch(option):
                    return None
                if option.lower() == b"upgrade":
                    connection_upgrade = True
        elif name == b"host":
            hosts += 1
        elif name == b"origin":
            origins += 1
            if origins > 1:
                return None
        elif name in (b"sec-websocket-protocol", b"transfer-encoding", b"content-length"):
            return None
        elif name == b"x-request-id" and sent_id is None:
            sent_id = value.decode("ascii")
    if (
        hosts != 1
        or not connection_upgrade
        or upgrade is None
        or upgrade.lower() != b"websocket"
        or version != b"13"
        or key is None
        or not _KEY.fullmatch(key)
    ):
        return None
    return request_line[1].decode("ascii"), key.decode("ascii"), sent_id


# (Sec-WebSocket-Key, X-Request-ID, query string) of a plain ``/v1/ws`` upgrade request.
PlainUpgrade = tuple[str, str | None, str]
_WS_REQUEST_START = b"GET " + WS_PATH.encode()


def plain_ws_upgrade(data: bytes) -> PlainUpgrade | None:
    """``plain_upgrade`` of a request for ``/v1/ws`` itself (and no other path)."""
    found = plain_upgrade(data)
    if found is None:
        return None
    target, key, sent_id = found
    raw_path, _, query = target.partition("?")
    if unquote(raw_path) != WS_PATH:
        return None
    return key, sent_id, query


def handshake_response(key: str) -> bytes:
    """The 101 response the websockets library sends, byte for byte."""
    return b"".join((
        b"HTTP/1.1 101 Switching Protocols\r\nDate: ",
        _http_date(),
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
        accept_key(key).encode(),
        b"\r\n\r\n",
    ))


def _http_date() -> bytes:
    """``Date:`` for now, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def _query_token(query: str) -> str | RepeatedToken | None:
    """The ``access_token`` query parameter as ``deps.query_token`` reads Starlette's
    ``query_params.getlist`` (blank values kept; ``REPEATED_TOKEN`` if it comes twice)."""
    if "access_token" not in query:
        return None
    if query.startswith("access_token=") and not any(c in query for c in "&%+"):
        return query[13:]  # the usual form, which parse_qsl would read the same way
    return query_token([value for key, value in parse_qsl(query, keep_blank_values=True)
                        if key == "access_token"])


def _request_id(sent: str | None) -> str:
    """The request id ``RequestContextMiddleware`` would give this upgrade."""
    if sent is not None:
        scope = {"headers": [(b"x-request-id", sent.encode("latin-1", "replace"))]}
        given = _client_request_id(scope)
        if given is not None:
            return given
    return _next_request_id()


WS_PROTOCOLS: dict[str, type[RawWebSocketProtocol]] = {
    "raw": RawWebSocketProtocol,
    "asgi": AsgiWebSocketProtocol,
}
