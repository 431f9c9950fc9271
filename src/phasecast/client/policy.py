"""Every retry decision of the Python client, in one place.

Links only report how they ended (``LinkDown``); ``Attempts.decide`` turns that into the next
step (reconnect after a delay, on which transport, with a fresh token or not) or into the
error that ends the watch. Delays are capped exponential backoff with full jitter, so that
many clients reconnecting after a server restart spread out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from phasecast.backoff import backoff_delay
from phasecast.client.errors import (
    AuthenticationError,
    ConnectionFailedError,
    ForbiddenError,
    JobNotFoundError,
    ProtocolError,
)
from phasecast.client.links import LinkDown, Outcome, Transport

RETRYABLE_JOB_ERRORS = frozenset({"unavailable", "too_many_subscriptions"})
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the client reconnects.

    - ``base_delay``, ``max_delay``: the n-th consecutive failure waits a random time in
      ``[0, min(max_delay, base_delay * 2**n))``. A link that was up and dropped retries at
      once-ish (n = 0).
    - ``give_up_after``: seconds without a working link after which the watch raises
      ``ConnectionFailedError``; ``None`` retries for ever.
    - ``fail_fast``: if the very first link of a watch cannot reach the server at all, raise
      at once instead of retrying (what a command-line tool wants; a backend waiting through
      a deployment does not).
    - ``websocket_failures_before_fallback``: WebSocket attempts in a row that reach the
      server but never open (a proxy refusing the upgrade) before falling back to SSE.
    - ``websocket_retry_interval``: how long the client stays on SSE before a new connection
      tries the WebSocket again.
    """

    base_delay: float = 0.25
    max_delay: float = 5.0
    give_up_after: float | None = 300.0
    fail_fast: bool = False
    websocket_failures_before_fallback: int = 2
    websocket_retry_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 <= base_delay <= max_delay")
        if self.give_up_after is not None and self.give_up_after <= 0:
            raise ValueError("give_up_after must be positive, or None to retry for ever")
        if self.websocket_failures_before_fallback < 1:
            raise ValueError("websocket_failures_before_fallback must be at least 1")

    def delay(self, failures: int) -> float:
        return backoff_delay(failures + 1, base=self.base_delay, cap=self.max_delay, jitter="full")


@dataclass(frozen=True, slots=True)
class Reconnect:
    delay: float
    fall_back_to_sse: bool = False


class Attempts:
    """What one watch has been through, and the decision after each link ends."""

    def __init__(self, policy: RetryPolicy, *, refreshable_token: bool, url: str) -> None:
        self.policy = policy
        self.refreshable_token = refreshable_token
        self.url = url
        self.failures = 0  # consecutive links that failed without opening
        self.websocket_failures = 0
        self.auth_retry_used = False
        self.ever_opened = False
        self.last_good = time.monotonic()

    def opened(self) -> None:
        self.failures = 0
        self.websocket_failures = 0
        self.auth_retry_used = False
        self.ever_opened = True
        self.last_good = time.monotonic()

    def decide(self, down: LinkDown) -> Reconnect:
        """The next step after ``down``, or raise the error that ends the watch."""
        if down.opened:
            self.opened()
        outcome, status = down.outcome, down.status
        if outcome is Outcome.REFRESH:
            return Reconnect(0.0)
        if self._unauthorized(down):
            if not self.refreshable_token:
                raise AuthenticationError(
                    f"the server refused the token ({down.message or 'unauthorized'}); pass a function "
                    "as token= so the client can ask for a fresh one, or a token that has not expired"
                )
            if self.auth_retry_used:
                raise AuthenticationError(
                    f"the server refused a freshly obtained token too ({down.message or 'unauthorized'}); "
                    "check that the token function returns a valid, unexpired token for this server"
                )
            self.auth_retry_used = True
            return Reconnect(0.0)
        if self._forbidden(down):
            raise ForbiddenError(down.message or "the token may not watch this job")
        if (outcome is Outcome.JOB_ERROR and down.code == "not_found") or (
            outcome is Outcome.REJECTED and down.transport == "sse" and status == 404
        ):
            raise JobNotFoundError(down.message or "no such job")
        if outcome is Outcome.JOB_ERROR and down.code not in RETRYABLE_JOB_ERRORS:
            raise ProtocolError(f"the server refused the watch: {down.code}: {down.message}")
        if outcome is Outcome.REJECTED and down.transport == "sse" and status not in RETRYABLE_HTTP:
            raise ProtocolError(f"the server answered {status} ({down.code}: {down.message})")
        return self._backoff(down)

    def _backoff(self, down: LinkDown) -> Reconnect:
        fall_back = False
        if down.transport == "websocket" and not down.opened and down.outcome in (
            Outcome.REJECTED, Outcome.CLOSED
        ):
            # The server (or something in front of it) answered, but no WebSocket came of it.
            self.websocket_failures += 1
            fall_back = self.websocket_failures >= self.policy.websocket_failures_before_fallback
        if down.outcome is Outcome.UNREACHABLE and self.policy.fail_fast and not self.ever_opened:
            raise ConnectionFailedError(
                f"cannot reach {self.url}: {down.message}; is the server running there?"
            )
        if down.opened:
            delay = self.policy.delay(0)
        else:
            delay = self.policy.delay(self.failures)
            self.failures += 1
        limit = self.policy.give_up_after
        if limit is not None and time.monotonic() + delay - self.last_good > limit:
            raise ConnectionFailedError(
                f"no working connection to {self.url} for {limit:.0f} s (last: {down.describe()})"
            )
        return Reconnect(delay, fall_back_to_sse=fall_back)

    @staticmethod
    def _unauthorized(down: LinkDown) -> bool:
        return (
            down.outcome is Outcome.EXPIRED
            or (down.outcome is Outcome.CLOSED and down.status == 4401)
            or (down.outcome is Outcome.REJECTED and down.transport == "sse" and down.status == 401)
            or (down.outcome is Outcome.JOB_ERROR and down.code in ("unauthorized", "token_expired"))
        )

    @staticmethod
    def _forbidden(down: LinkDown) -> bool:
        return (
            (down.outcome is Outcome.CLOSED and down.status == 4403)
            or (down.outcome is Outcome.REJECTED and down.transport == "sse" and down.status == 403)
            or (down.outcome is Outcome.JOB_ERROR and down.code == "forbidden")
        )


__all__ = ["Attempts", "Reconnect", "RetryPolicy", "Transport"]
