"""Single-use links to a server, one job each: a WebSocket or an SSE stream.

A link opens, reports what the server sends (``Opened``, ``Authenticated``, states) and, when
it ends for any reason other than the job's terminal state, raises ``LinkDown`` saying what
happened. It never retries, never sleeps and never decides anything: all of that is the
client's (``policy.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import quote

import httpx
import httpx_sse
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State

from phasecast.client.tokens import Token
from phasecast.model import JobState

log = logging.getLogger("phasecast.client")

Transport = Literal["websocket", "sse"]
MAX_FRAME_BYTES = 1024 * 1024


class Outcome(StrEnum):
    UNREACHABLE = "unreachable"  # no connection at all: refused, DNS, connect timeout
    REJECTED = "rejected"  # the request or upgrade was answered with an error before the link opened
    CLOSED = "closed"  # the link ended: a close code, the stream ended, the server went quiet
    EXPIRED = "expired"  # the server ended the link because the token expired
    REFRESH = "refresh"  # the client ended the link to carry on with a fresh token
    JOB_ERROR = "job_error"  # the server refused to stream this job (an ``error`` frame or event)
    # The server has nothing after the resume point: the job already reached its terminal state
    # at or before it (SSE answers 204 No Content). The watch is over, not refused.
    ENDED = "ended"


class LinkDown(Exception):
    """How a link ended, for the retry policy to judge."""

    def __init__(
        self,
        transport: Transport,
        outcome: Outcome,
        *,
        opened: bool,
        status: int | None = None,
        code: str | None = None,
        message: str = "",
    ) -> None:
        self.transport = transport
        self.outcome = outcome
        self.opened = opened  # the server accepted this link before it ended
        self.status = status  # HTTP status or WebSocket close code
        self.code = code  # the protocol's error code, when the server sent one
        self.message = message
        super().__init__(self.describe())

    def describe(self) -> str:
        parts = [f"{self.transport} {self.outcome.value}"]
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        if self.message:
            parts.append(self.message)
        return ": ".join(parts)


@dataclass(frozen=True, slots=True)
class Opened:
    """The server accepted the link (authenticated and subscribed)."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The server accepted a token; ``expires_at`` is when it will stop accepting it."""

    expires_at: float | None


LinkEvent = Opened | Authenticated | JobState


def parse_state(data: Any, transport: Transport) -> JobState:
    """A state from the wire, checked: anything malformed ends the link as a protocol error."""
    try:
        if not isinstance(data, dict):
            raise TypeError("not an object")
        state = JobState.from_dict(data)
        if isinstance(data["seq"], bool) or not isinstance(data["seq"], int):
            raise TypeError("seq is not an integer")
    except (KeyError, TypeError, ValueError) as exc:
        raise LinkDown(transport, Outcome.JOB_ERROR, opened=True, code="protocol",
                       message=f"malformed state from the server ({exc})") from None
    return state


def _error_body(body: bytes) -> tuple[str | None, str]:
    try:
        error = json.loads(body).get("error", {})
        return str(error.get("code")), str(error.get("message"))
    except (ValueError, AttributeError):
        return None, body[:200].decode(errors="replace")


class WebSocketLink:
    transport: Transport = "websocket"

    def __init__(self, base_url: str, job_id: str, since: int, token: Token | None, *,
                 open_timeout: float, epoch: str | None = None) -> None:
        scheme, _, rest = base_url.partition("://")
        self.url = ("wss" if scheme == "https" else "ws") + "://" + rest + "/v1/ws"
        self.job_id = job_id
        self.since = since
        self.epoch = epoch  # of the state at ``since``: a job made again after a store loss is sent in full
        self.token = token
        self.open_timeout = open_timeout
        self._socket: ClientConnection | None = None

    def _down(self, outcome: Outcome, opened: bool, **fields: Any) -> LinkDown:
        return LinkDown(self.transport, outcome, opened=opened, **fields)

    async def events(self) -> AsyncGenerator[LinkEvent, None]:
        try:
            # compression off: progress frames are small, and deflate costs the server CPU
            # for every frame it sends.
            self._socket = await websockets.connect(
                self.url, open_timeout=self.open_timeout, compression=None, max_size=MAX_FRAME_BYTES,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            raise self._down(Outcome.REJECTED, False, status=exc.response.status_code,
                             message="the WebSocket upgrade was refused") from None
        except (InvalidHandshake, InvalidURI) as exc:
            raise self._down(Outcome.REJECTED, False, message=f"no WebSocket here ({exc})") from None
        except (OSError, TimeoutError) as exc:
            raise self._down(Outcome.UNREACHABLE, False, message=_reason(exc)) from None
        socket = self._socket
        opened = False
        try:
            # The token goes in the first message, not the URL, so no proxy or access log sees it.
            if self.token is not None:
                await socket.send(json.dumps({"op": "auth", "token": self.token.value}))
            subscribe: dict[str, Any] = {"op": "subscribe", "job_id": self.job_id, "since": self.since}
            if self.epoch is not None:
                subscribe["epoch"] = self.epoch
            await socket.send(json.dumps(subscribe))
            async for raw in socket:
                try:
                    message = json.loads(raw)
                    kind = message["type"]
                except (ValueError, TypeError, KeyError):
                    raise self._down(Outcome.JOB_ERROR, opened, code="protocol",
                                     message=f"unreadable frame {str(raw)[:80]!r}") from None
                if kind == "state":
                    if not opened:
                        opened = True
                        yield Opened()
                    state = parse_state(message.get("job"), self.transport)
                    if state.job_id == self.job_id:
                        yield state
                elif kind == "subscribed" and message.get("job_id") == self.job_id:
                    if not opened:
                        opened = True
                        yield Opened()
                elif kind == "authenticated":
                    expires_at = message.get("expires_at")
                    yield Authenticated(float(expires_at) if isinstance(expires_at, int | float) else None)
                elif kind == "error":
                    raise self._down(Outcome.JOB_ERROR, opened, code=str(message.get("code")),
                                     message=str(message.get("message", "")))
                # ping, pong, unsubscribed and frames this version does not know: nothing to do
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
            outcome = Outcome.EXPIRED if code == 4401 and "expired" in reason else Outcome.CLOSED
            raise self._down(outcome, opened, status=code, message=reason) from None
        except OSError as exc:
            raise self._down(Outcome.CLOSED, opened, status=1006, message=_reason(exc)) from None
        # The server closed cleanly without a close frame we could read.
        raise self._down(Outcome.CLOSED, opened, status=socket.close_code, message="closed")

    async def reauthenticate(self, token: Token) -> None:
        """Hand the open connection a fresh token (``{"op":"auth"}``) before the old one expires."""
        self.token = token
        if self._socket is not None:
            with contextlib.suppress(ConnectionClosed):  # the reader hears about it
                await self._socket.send(json.dumps({"op": "auth", "token": token.value}))

    async def close(self) -> None:
        socket, self._socket = self._socket, None
        if socket is None:
            return
        try:
            await socket.close()
        finally:
            if socket.state is not State.CLOSED:
                # The closing handshake was cut short (the task was cancelled while the
                # server had not answered yet): drop the TCP connection now. Otherwise the
                # socket stays open until the server closes it, or, when the event loop
                # stops first, until the garbage collector finds it unclosed.
                socket.transport.abort()


class SSELink:
    transport: Transport = "sse"

    def __init__(self, http: httpx.AsyncClient, job_id: str, since: int, token: Token | None, *,
                 open_timeout: float, idle_timeout: float, epoch: str | None = None) -> None:
        self.http = http
        self.job_id = job_id
        self.since = since
        self.epoch = epoch  # of the state at ``since``: a job made again after a store loss is sent in full
        self.token = token
        self.timeout = httpx.Timeout(open_timeout, read=idle_timeout)
        self._response: httpx.Response | None = None

    def _down(self, outcome: Outcome, opened: bool, **fields: Any) -> LinkDown:
        return LinkDown(self.transport, outcome, opened=opened, **fields)

    async def events(self) -> AsyncGenerator[LinkEvent, None]:
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token.value}"}
        url = f"/v1/jobs/{quote(self.job_id, safe='')}/events"
        # The resume point is the stream's own event id, ``<seq>.<epoch>``, when the epoch is
        # known (the server then recognises a job made again after a store loss); the seq alone
        # otherwise.
        params: dict[str, str | int] = {"since": self.since}
        if self.since and self.epoch is not None and _EPOCH.fullmatch(self.epoch):
            params = {"last_event_id": f"{self.since}.{self.epoch}"}
        opened = False
        try:
            async with httpx_sse.aconnect_sse(
                self.http, "GET", url, params=params, headers=headers, timeout=self.timeout,
            ) as source:
                self._response = source.response
                if source.response.status_code == 204:
                    raise self._down(Outcome.ENDED, False, status=204,
                                     message="nothing after the resume point: the job has ended")
                if source.response.status_code != 200:
                    code, message = _error_body(await source.response.aread())
                    raise self._down(Outcome.REJECTED, False, status=source.response.status_code,
                                     code=code, message=message)
                opened = True
                yield Opened()
                async for event in source.aiter_sse():
                    if not event.data:
                        continue  # a ``retry:`` field alone; the spec dispatches nothing for it
                    if event.event in ("state", "message"):
                        try:
                            data = json.loads(event.data)
                        except ValueError:
                            raise self._down(Outcome.JOB_ERROR, True, code="protocol",
                                             message=f"unreadable event {event.data[:80]!r}") from None
                        state = parse_state(data, self.transport)
                        if state.job_id == self.job_id:
                            yield state
                    elif event.event in ("expired", "error"):
                        code, message = _error_body(f'{{"error":{event.data}}}'.encode())
                        outcome = Outcome.EXPIRED if event.event == "expired" else Outcome.JOB_ERROR
                        raise self._down(outcome, True, code=code, message=message)
        except httpx_sse.SSEError as exc:
            raise self._down(Outcome.REJECTED, False, status=200, message=str(exc)) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._down(Outcome.UNREACHABLE, False, message=_reason(exc)) from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise self._down(Outcome.CLOSED, opened, message=_reason(exc) or type(exc).__name__) from None
        raise self._down(Outcome.CLOSED, opened, message="the stream ended")

    async def close(self) -> None:
        if self._response is not None:
            await self._response.aclose()
            self._response = None


_EPOCH = re.compile(r"[A-Za-z0-9]{1,32}")  # what an epoch in a per-job event id may be


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__)
    return text or type(exc).__name__
