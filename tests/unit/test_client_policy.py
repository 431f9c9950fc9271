"""The Python client's retry policy: every way a link can end, and what the client does next."""

from __future__ import annotations

import time

import pytest

from phasecast.client import (
    AuthenticationError,
    ConnectionFailedError,
    ForbiddenError,
    JobNotFoundError,
    ProtocolError,
    RetryPolicy,
)
from phasecast.client.links import LinkDown, Outcome
from phasecast.client.policy import Attempts
from phasecast.client.tokens import Token, unverified_expiry
from phasecast.config import Settings
from phasecast.server.auth import mint_token


def attempts(policy: RetryPolicy | None = None, refreshable: bool = True) -> Attempts:
    return Attempts(policy or RetryPolicy(), refreshable_token=refreshable, url="http://x")


def ws(outcome: Outcome, opened: bool = False, **fields: object) -> LinkDown:
    return LinkDown("websocket", outcome, opened=opened, **fields)  # type: ignore[arg-type]


def sse(outcome: Outcome, opened: bool = False, **fields: object) -> LinkDown:
    return LinkDown("sse", outcome, opened=opened, **fields)  # type: ignore[arg-type]


def test_delays_are_jittered_and_capped() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=2.0)
    for failures in range(12):
        for _ in range(50):
            assert 0 <= policy.delay(failures) <= min(2.0, 0.5 * 2**failures)
    assert len({round(policy.delay(5), 6) for _ in range(20)}) > 1


def test_backoff_grows_with_failures_and_resets_once_a_link_opened() -> None:
    state = attempts(RetryPolicy(base_delay=1.0, max_delay=1000.0, give_up_after=None))
    for _ in range(6):
        state.decide(ws(Outcome.UNREACHABLE))
    assert state.failures == 6
    state.decide(ws(Outcome.CLOSED, opened=True, status=1012))
    assert state.failures == 0
    assert state.decide(ws(Outcome.CLOSED, opened=True, status=1006)).delay <= 1.0


@pytest.mark.parametrize("down", [
    ws(Outcome.CLOSED, status=4401),
    ws(Outcome.EXPIRED, opened=True, status=4401),
    sse(Outcome.REJECTED, status=401),
    sse(Outcome.EXPIRED, opened=True, code="token_expired"),
])
def test_a_refused_token_is_refreshed_once_then_fatal(down: LinkDown) -> None:
    state = attempts()
    assert state.decide(down).delay == 0
    refused_again = LinkDown(down.transport, Outcome.CLOSED if down.transport == "websocket" else Outcome.REJECTED,
                             opened=False, status=4401 if down.transport == "websocket" else 401)
    with pytest.raises(AuthenticationError, match="freshly obtained"):
        state.decide(refused_again)
    with pytest.raises(AuthenticationError, match="function"):
        attempts(refreshable=False).decide(down)


def test_a_link_that_opened_between_refusals_earns_another_refresh() -> None:
    state = attempts()
    state.decide(ws(Outcome.EXPIRED, opened=True, status=4401))
    state.opened()
    assert state.decide(ws(Outcome.EXPIRED, opened=True, status=4401)).delay == 0


@pytest.mark.parametrize(("down", "error"), [
    (ws(Outcome.CLOSED, status=4403), ForbiddenError),
    (ws(Outcome.JOB_ERROR, opened=True, code="forbidden"), ForbiddenError),
    (sse(Outcome.REJECTED, status=403), ForbiddenError),
    (ws(Outcome.JOB_ERROR, opened=True, code="not_found"), JobNotFoundError),
    (sse(Outcome.REJECTED, status=404), JobNotFoundError),
    (ws(Outcome.JOB_ERROR, opened=True, code="invalid"), ProtocolError),
    (ws(Outcome.JOB_ERROR, opened=True, code="protocol"), ProtocolError),
    (sse(Outcome.REJECTED, status=422), ProtocolError),
])
def test_refusals_that_retrying_cannot_fix_end_the_watch(down: LinkDown, error: type[Exception]) -> None:
    with pytest.raises(error):
        attempts().decide(down)


@pytest.mark.parametrize("down", [
    sse(Outcome.REJECTED, status=503),
    sse(Outcome.REJECTED, status=429),
    ws(Outcome.JOB_ERROR, opened=True, code="unavailable"),
    ws(Outcome.CLOSED, opened=True, status=1012),
    sse(Outcome.CLOSED, opened=True),
])
def test_passing_trouble_is_retried(down: LinkDown) -> None:
    assert attempts().decide(down).fall_back_to_sse is False


def test_websocket_refused_by_something_in_between_falls_back_to_sse() -> None:
    state = attempts(RetryPolicy(websocket_failures_before_fallback=2))
    assert not state.decide(ws(Outcome.REJECTED, status=403)).fall_back_to_sse
    assert state.decide(ws(Outcome.CLOSED, status=1006)).fall_back_to_sse
    # A server that is down is not a reason to leave the WebSocket.
    fresh = attempts(RetryPolicy(websocket_failures_before_fallback=1, give_up_after=None))
    for _ in range(5):
        assert not fresh.decide(ws(Outcome.UNREACHABLE)).fall_back_to_sse


def test_giving_up() -> None:
    with pytest.raises(ConnectionFailedError, match="cannot reach"):
        attempts(RetryPolicy(fail_fast=True)).decide(ws(Outcome.UNREACHABLE, message="refused"))
    once_open = attempts(RetryPolicy(fail_fast=True))
    once_open.opened()
    assert once_open.decide(ws(Outcome.UNREACHABLE)).delay >= 0  # a restart is waited for
    stale = attempts(RetryPolicy(give_up_after=1))
    stale.last_good = time.monotonic() - 2
    with pytest.raises(ConnectionFailedError, match="no working connection"):
        stale.decide(sse(Outcome.UNREACHABLE))


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="base_delay"):
        RetryPolicy(base_delay=2, max_delay=1)
    with pytest.raises(ValueError, match="give_up_after"):
        RetryPolicy(give_up_after=0)


def test_token_refresh_time() -> None:
    now = time.time()
    short = Token("t", now, now + 10)
    refresh_at = short.refresh_at()
    assert refresh_at is not None
    assert refresh_at == pytest.approx(now + 8)  # 80 % of a short lifetime
    long = Token("t", now, now + 3600)
    assert long.refresh_at() == pytest.approx(now + 3570)  # 30 s before a long one ends
    assert Token("t", now, None).refresh_at() is None
    minted = mint_token(Settings(jwt_secret="x" * 40), "alice", ["jobs:read"], 120)
    expiry = unverified_expiry(minted)
    assert expiry is not None
    assert now + 110 < expiry <= now + 121
    assert unverified_expiry("not-a-jwt") is None
