"""``PhasecastClient``: watch jobs from Python, over WebSocket with SSE as the fallback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import httpx

from phasecast.client.errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    ForbiddenError,
    JobNotFoundError,
    ProtocolError,
)
from phasecast.client.links import (
    Authenticated,
    LinkDown,
    LinkEvent,
    Opened,
    Outcome,
    SSELink,
    Transport,
    WebSocketLink,
    parse_state,
)
from phasecast.client.policy import Attempts, RetryPolicy
from phasecast.client.tokens import Token, TokenSource, TokenSpec
from phasecast.model import JOB_ID_PATTERN, JobState

log = logging.getLogger("phasecast.client")

# A token function that fails is asked again this often until the token in use expires.
TOKEN_RETRY_SECONDS = 2.0
# How long a token that arrives already due for refresh is used before asking again.
MIN_REFRESH_SECONDS = 1.0


@dataclass
class ClientStats:
    """Counters for diagnostics (and tests): links opened per transport, token refreshes (sent
    on the open WebSocket; on SSE a planned reconnect), reconnects, fallbacks to SSE."""

    links: dict[str, int] = field(default_factory=lambda: {"websocket": 0, "sse": 0})
    token_refreshes: int = 0
    reconnects: int = 0
    fallbacks: int = 0


class PhasecastClient:
    """Watch Phasecast jobs.

    ``token`` is a string, or a function (sync or async) returning one; a function is asked
    again for every new connection and shortly before the token in use expires, so watches
    outlive short-lived tokens. ``transports`` lists the transports to use, in order of
    preference: by default the WebSocket, falling back to SSE when the WebSocket cannot be
    opened (``RetryPolicy.websocket_failures_before_fallback``).

    Use it as an async context manager; each ``watch`` holds one connection while it runs,
    and a watch left with ``break`` is closed when the client is, at the latest.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: TokenSpec = None,
        retry: RetryPolicy | None = None,
        transports: tuple[Literal["websocket", "sse"], ...] = ("websocket", "sse"),
        open_timeout: float = 10.0,
        idle_timeout: float = 45.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not transports or any(t not in ("websocket", "sse") for t in transports):
            raise ValueError("transports must name 'websocket', 'sse' or both")
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.transports = transports
        self.open_timeout = open_timeout
        # The server sends a heartbeat every 15 s (ping_interval); a stream quiet for longer
        # than this is taken as dead and replaced.
        self.idle_timeout = idle_timeout
        self.stats = ClientStats()
        self._tokens = TokenSource(token)
        self._sse_until = 0.0  # monotonic time until which new links use SSE
        self._http: httpx.AsyncClient | None = None
        # Watches not yet finished: ``aclose`` closes those a consumer left with ``break``.
        self._watches: weakref.WeakSet[AsyncGenerator[JobState, None]] = weakref.WeakSet()

    async def __aenter__(self) -> PhasecastClient:
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.open_timeout)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client: first every watch a consumer left unfinished (``break`` out of
        ``async for``: Python does not close the generator, and its connection would stay
        open until the garbage collector found it), then the HTTP client."""
        for watch in list(self._watches):
            if getattr(watch, "ag_running", False):
                continue  # being read by another task: cancelling that task closes it
            with contextlib.suppress(Exception):
                await watch.aclose()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("use the client as `async with PhasecastClient(...) as client:`")
        return self._http

    # --- one-shot reads --------------------------------------------------------------------

    async def get(self, job_id: str) -> JobState:
        """The current state of a job (``GET /v1/jobs/{id}``)."""
        _check_job_id(job_id)
        token = await self._tokens.get()
        headers = {} if token is None else {"Authorization": f"Bearer {token.value}"}
        try:
            reply = await self.http.get(f"/v1/jobs/{job_id}", headers=headers)
        except httpx.TransportError as exc:
            raise ConnectionFailedError(f"cannot reach {self.base_url}: {exc}") from None
        if reply.status_code == 200:
            try:
                return parse_state(reply.json(), "sse")
            except LinkDown as down:
                raise ProtocolError(down.message) from None
            except ValueError:
                raise ProtocolError(f"GET /v1/jobs/{job_id} did not answer JSON") from None
        message = _reply_message(reply)
        error: type[ClientError] = {
            401: AuthenticationError, 403: ForbiddenError, 404: JobNotFoundError
        }.get(reply.status_code, ProtocolError)
        raise error(f"{reply.status_code}: {message}")

    async def wait(self, job_id: str) -> JobState:
        """Wait for the job to end and return its terminal state (at once if it has ended).
        Bound the wait with ``asyncio.timeout`` if you need to."""
        final: JobState | None = None
        async for state in self.watch(job_id):
            final = state
        if final is None or not final.terminal:
            # watch ends after the terminal state; should it ever end otherwise, the server
            # has the answer.
            final = await self.get(job_id)
        return final

    # --- watching ---------------------------------------------------------------------------

    def watch(self, job_id: str) -> AsyncGenerator[JobState, None]:
        """``async for state in client.watch(job_id)``: see ``_watch``."""
        watch = self._watch(job_id)
        self._watches.add(watch)
        return watch

    async def _watch(self, job_id: str) -> AsyncGenerator[JobState, None]:
        """Yield each new state of the job, ``seq`` strictly increasing, ending after the
        terminal state. Reconnects (resuming after the last ``seq``) across dropped links and
        server restarts; a consumer slower than the job gets the newest state, skipping
        intermediate ones, never the terminal one. After a store loss the job's states start
        again under a new ``epoch``: the first state of a new epoch is yielded whatever its
        ``seq``, and ``seq`` increases from there. Raises a ``ClientError`` subclass when
        retrying cannot help (refused token, no such job, server unreachable for too long).

        The connection is closed when the watch ends, raises or is cancelled. A watch left
        early with ``break`` keeps its connection until the client is closed (Python does
        not close an async generator left by ``break``); to close it at once, wrap the watch
        in ``contextlib.aclosing(...)``."""
        _check_job_id(job_id)
        attempts = Attempts(self.retry, refreshable_token=self._tokens.refreshable, url=self.base_url)
        last_seq = 0
        last_epoch: str | None = None
        first = True
        prefetched: list[Token] = []  # a fresh token the SSE refresh obtained for the next link
        while True:
            transport = self._pick_transport()
            if not first:
                self.stats.reconnects += 1
            first = False
            token = prefetched.pop() if prefetched else await self._tokens.get()
            try:
                # Closed here, not left to the garbage collector: after the terminal state
                # (or a consumer's break) the link is closed before the watch returns. Left
                # unclosed, the generator was closed by a task asyncio schedules when it is
                # collected, which an event loop shutting down cancels or never runs, leaving
                # the link's socket open.
                following = self._follow(transport, job_id, last_seq, last_epoch, token, attempts, prefetched)
                async with contextlib.aclosing(following):
                    async for state in following:
                        if state.seq <= last_seq and state.epoch == last_epoch:
                            continue
                        last_seq, last_epoch = state.seq, state.epoch
                        yield state
                        if state.terminal:
                            return
            except LinkDown as down:
                if down.outcome is Outcome.ENDED:
                    # SSE's 204: the job reached its terminal state at or before the resume
                    # point. Yield that state unless this watch already has it (it never
                    # does when seqs are of one epoch: the terminal state ends the watch).
                    final = await self.get(job_id)
                    if final.terminal:
                        if final.seq > last_seq or final.epoch != last_epoch:
                            yield final
                        return
                    # Moved on since the 204 (made again after a store loss): follow it.
                step = attempts.decide(down)  # raises when the watch cannot go on
                if down.outcome is Outcome.REFRESH:
                    self.stats.token_refreshes += 1
                if step.fall_back_to_sse and "sse" in self.transports:
                    self._sse_until = time.monotonic() + self.retry.websocket_retry_interval
                    self.stats.fallbacks += 1
                    log.warning("WebSocket unavailable at %s (%s); using SSE", self.base_url, down.describe())
                else:
                    log.info("link to %s ended (%s); reconnecting in %.2f s", self.base_url,
                             down.describe(), step.delay)
                if step.delay:
                    await asyncio.sleep(step.delay)

    def _pick_transport(self) -> Transport:
        if self.transports[0] == "sse":
            return "sse"
        if "sse" in self.transports and time.monotonic() < self._sse_until:
            return "sse"
        return "websocket"

    async def _follow(
        self,
        transport: Transport,
        job_id: str,
        since: int,
        epoch: str | None,
        token: Token | None,
        attempts: Attempts,
        prefetched: list[Token],
    ) -> AsyncGenerator[JobState, None]:
        """One link: its states, until it ends (``LinkDown``) or the job does."""
        self.stats.links[transport] += 1
        link: WebSocketLink | SSELink
        if transport == "websocket":
            link = WebSocketLink(self.base_url, job_id, since, token, open_timeout=self.open_timeout,
                                 epoch=epoch)
        else:
            link = SSELink(self.http, job_id, since, token, open_timeout=self.open_timeout,
                           idle_timeout=self.idle_timeout, epoch=epoch)
        events = link.events()
        refresher: asyncio.Task[None] | None = None
        # An SSE stream cannot change its token: when the token is due for refresh the stream
        # is ended and the watch reconnects at once with a fresh one.
        deadline = None
        if transport == "sse" and self._tokens.refreshable and token is not None:
            due = token.refresh_at()
            if due is not None:
                deadline = asyncio.get_running_loop().time() + _until(due)
        loop = asyncio.get_running_loop()
        # While a refresh is due, the next event is read in a task of its own, so the deadline
        # can pass (and a failed token function be asked again) without cancelling the read,
        # which would end the link's generator.
        pending: asyncio.Task[LinkEvent | None] | None = None
        try:
            while True:
                if deadline is None:
                    try:
                        event: LinkEvent = await anext(events)
                    except StopAsyncIteration:
                        return
                else:
                    if pending is None:
                        pending = asyncio.create_task(_next_event(events))
                    done, _ = await asyncio.wait({pending}, timeout=max(0.0, deadline - loop.time()))
                    if not done:
                        # Get the fresh token before giving up a working stream; if the
                        # function fails, keep the stream and ask again shortly, until the
                        # token expires (the reconnect then asks once more).
                        assert token is not None
                        fresh = await self._fresh_token()
                        if fresh is None:
                            if token.expires_at is not None and time.time() >= token.expires_at:
                                raise LinkDown(
                                    "sse", Outcome.EXPIRED, opened=True,
                                    message="the token expired and the token function failed",
                                )
                            deadline = loop.time() + _retry_pause(token)
                            continue
                        prefetched.append(fresh)
                        raise LinkDown("sse", Outcome.REFRESH, opened=True)
                    finished, pending = pending, None
                    next_event = finished.result()  # raises what the link raised (LinkDown)
                    if next_event is None:
                        return
                    event = next_event
                if isinstance(event, Opened):
                    attempts.opened()
                    if isinstance(link, WebSocketLink) and refresher is None and link.token is not None:
                        refresher = asyncio.create_task(self._refresh_forever(link, link.token))
                elif isinstance(event, Authenticated):
                    if isinstance(link, WebSocketLink) and link.token is not None:
                        current = link.token.with_expiry(event.expires_at)
                        link.token = current
                        if refresher is not None:
                            refresher.cancel()
                            refresher = asyncio.create_task(self._refresh_forever(link, current))
                    elif token is not None:
                        token = token.with_expiry(event.expires_at)
                else:
                    yield event
        finally:
            try:
                for task in (pending, refresher):
                    if task is not None and not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, LinkDown):
                            await task
                await events.aclose()
            finally:
                # Even when cancelled while stopping the tasks above.
                await link.close()

    async def _fresh_token(self) -> Token | None:
        """A new token from the function, or ``None`` (logged) if it failed this time."""
        try:
            fresh = await self._tokens.get()
        except Exception as exc:  # the function's own failure: the caller asks again later
            log.warning("the token function failed (%s); the current token is kept for now", exc)
            return None
        assert fresh is not None
        return fresh

    async def _refresh_forever(self, link: WebSocketLink, token: Token) -> None:
        """Hand the open WebSocket a fresh token before the one in use expires."""
        if not self._tokens.refreshable:
            return
        while True:
            due = token.refresh_at()
            if due is None:
                return
            await asyncio.sleep(_until(due))
            fresh = await self._fresh_token()
            while fresh is None:
                if token.expires_at is not None and time.time() >= token.expires_at:
                    return  # the server closes with 4401; the reconnect asks again
                await asyncio.sleep(_retry_pause(token))
                fresh = await self._fresh_token()
            await link.reauthenticate(fresh)
            self.stats.token_refreshes += 1
            log.debug("token refreshed on the open WebSocket")
            token = fresh


async def _next_event(events: AsyncGenerator[LinkEvent, None]) -> LinkEvent | None:
    """The link's next event, or ``None`` when it has no more."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


def _retry_pause(token: Token) -> float:
    """How long to wait before asking a failed token function again: TOKEN_RETRY_SECONDS, or
    less when the token in use expires sooner, so several tries fit before it does."""
    if token.expires_at is None:
        return TOKEN_RETRY_SECONDS
    return min(TOKEN_RETRY_SECONDS, max(0.1, (token.expires_at - time.time()) / 3))


def _until(due: float) -> float:
    """Seconds until a token's refresh time. A token that arrives already past it (a function
    handing out tokens about to expire) waits MIN_REFRESH_SECONDS, so the client cannot spin;
    the server's refusal at expiry then decides."""
    left = due - time.time()
    return left if left > 0 else MIN_REFRESH_SECONDS


def _check_job_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(
            f"invalid job id {job_id!r}: 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )


def _reply_message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:200] or reply.reason_phrase
