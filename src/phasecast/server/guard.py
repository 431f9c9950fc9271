"""Bounding request bytes before any work is done.

Two layers share the helpers here:

- ``RequestGuard``, a pure ASGI layer in front of everything, caps every HTTP request body at
  the largest cap of any route (``Settings.max_body_bytes`` and the per-route caps): when
  the body is first read if ``Content-Length`` is over it, and while the body streams in
  otherwise (chunked). Routes that read their body themselves (the RunPod webhook, after
  checking its URL token) are covered by it.
- ``server.jsonbody.JSONRoute`` applies each REST route's own, smaller cap the same way, after
  checking the bearer token: an unauthenticated caller costs one header parse however large
  its body.

Refusals are the ordinary JSON error body, 413 ``too_large`` (401 ``unauthorized`` for the
token), sent with ``Connection: close`` when body bytes are still on their way, so the server
stops reading them.

``RequestGuard`` also bounds the time a body may take (``Settings.request_timeout``, from
the start of the request's ASGI call, i.e. the end of its headers): a ``receive`` still
waiting for body bytes at the deadline raises ``BodyTimedOut``, answered 408
``request_timeout`` with ``Connection: close`` (nothing was stored: no route works on a body
it has not read in full). One deadline per request, kept in its scope, so layers that read
the body before the guard (``server/ingest.py``'s ``ThinReports``) share it. A request
without a body costs nothing; one with a body, one timer per ``receive`` that waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phasecast.errors import PhasecastError

PRINCIPAL_STATE_KEY = "phasecast.principal"
DEADLINE_SCOPE_KEY = "phasecast.body_deadline"  # loop time by which the body must be in
# Before refusing a body, up to this many more of its bytes are read and dropped (memory
# stays flat), so that a client whose body is only a little over a cap has sent it all and
# reads the 413 cleanly. Anything larger is cut off: the answer goes out, the connection
# closes, and the sender's remaining bytes are never read.
DRAIN_BYTES = 1024 * 1024


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than this route's limit of {limit} bytes; "
            "send less (split a batch), or raise the limit in the server's settings")


class TooLarge(PhasecastError):
    """413: a body over its route's cap."""

    code = "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(too_large_message(limit))
        self.limit = limit


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its cap. An ``HTTPException``, so
    that FastAPI's body reading lets it through to the error handlers unchanged (they answer
    413 ``too_large``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit), headers={"Connection": "close"})
        self.limit = limit


def timed_out_message(timeout: float) -> str:
    return (f"the request did not arrive in full within {timeout:g} seconds; send the whole "
            "request at once (the limit is the server's request_timeout setting)")


class TimedOut(PhasecastError):
    """408: a request whose headers or body did not arrive in time."""

    code = "request_timeout"

    def __init__(self, timeout: float) -> None:
        super().__init__(timed_out_message(timeout))
        self.timeout = timeout


class BodyTimedOut(HTTPException):
    """Raised from ``receive`` when a body is not in by its deadline; an ``HTTPException``
    for the same reason as ``BodyTooLarge`` (the handlers answer 408 ``request_timeout``)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408, timed_out_message(timeout), headers={"Connection": "close"})
        self.timeout = timeout


def timed(scope: Scope, receive: Receive, timeout: float) -> Receive:
    """``receive`` that raises ``BodyTimedOut`` if the body is not in within ``timeout``
    seconds of the first call for this request (of any layer: the deadline is kept in the
    scope). Once the body is complete, later calls (waiting for the client to go away) are
    not bounded."""
    complete = False

    async def bounded() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        deadline = scope.get(DEADLINE_SCOPE_KEY)
        if deadline is None:
            deadline = scope[DEADLINE_SCOPE_KEY] = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise BodyTimedOut(timeout) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return bounded


def body_framing(scope: Scope) -> tuple[int | None, bool]:
    """``(Content-Length or None, chunked?)``. The HTTP server has already refused
    malformed framing headers."""
    length: int | None = None
    chunked = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


def body_pending(scope: Scope) -> bool:
    """Whether the request announced a body (that may not have been read)."""
    length, chunked = body_framing(scope)
    return chunked or bool(length)


def expects_continue(scope: Scope) -> bool:
    """``Expect: 100-continue``: the client sends its body only once the server asks for
    it (by reading it), so a refusal before reading costs nothing to drain."""
    return any(
        name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ())
    )


def capped(receive: Receive, limit: int, length: int | None = None) -> Receive:
    """``receive`` that raises ``BodyTooLarge`` once more than ``limit`` body bytes came, or
    at the first call if the announced ``length`` (Content-Length) is over the limit."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        if length is not None and length > limit:
            # A body announced as only a little over the cap is read to its end, so the
            # client, still sending, reads the 413 instead of a reset; a far larger one is
            # cut off after the usual drain.
            await drain(receive, length if length <= limit + DRAIN_BYTES else DRAIN_BYTES)
            raise BodyTooLarge(limit)
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body", False):
                    await drain(receive)
                raise BodyTooLarge(limit)
        return message

    return limited


async def drain(receive: Receive, budget: int = DRAIN_BYTES) -> None:
    """Read and drop what is left of a request body, up to ``budget`` bytes."""
    dropped = 0
    while dropped <= budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


Refuse = Callable[[Request, PhasecastError], Any]


class RequestGuard:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, refuse: Refuse, request_timeout: float = 30.0
    ) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.timeout = request_timeout
        self.refuse = refuse  # builds the JSON error response for a PhasecastError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Refused when the body is first read, not before: a route that checks a token
        # first answers 401 to a caller without one, whatever its Content-Length.
        length, chunked = body_framing(scope)
        if chunked or length:
            receive = timed(scope, receive, self.timeout)
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped(receive, self.limit, length), watched_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, TooLarge(self.limit))
        except BodyTimedOut:
            if started:
                raise
            await self._refuse(scope, receive, send, TimedOut(self.timeout))

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: PhasecastError) -> None:
        response = self.refuse(Request(scope), error)
        await response(scope, receive, send)
