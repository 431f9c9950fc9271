"""Where the client's token comes from, and when it must be asked for a new one.

A token is a string (used as it is, never refreshed) or a function, sync or async, that is
asked again for every new connection and shortly before the token in use expires.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import jwt

TokenFunction = Callable[[], str] | Callable[[], Awaitable[str]]
TokenSpec = str | TokenFunction | None

# Refresh this long before expiry at most, and at 80 % of the lifetime for short tokens.
REFRESH_LEAD_SECONDS = 30.0
REFRESH_LIFETIME_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    obtained_at: float  # time.time() when the client got it
    expires_at: float | None  # unix seconds, from the server's ``authenticated`` frame or ``exp``

    def refresh_at(self) -> float | None:
        """When to ask for a new token: at 80 % of its lifetime or 30 s before it expires,
        whichever is earlier; ``None`` if it never expires."""
        if self.expires_at is None:
            return None
        lifetime = max(0.0, self.expires_at - self.obtained_at)
        lead = min(REFRESH_LEAD_SECONDS, lifetime * (1 - REFRESH_LIFETIME_SHARE))
        return self.expires_at - lead

    def with_expiry(self, expires_at: float | None) -> Token:
        return Token(self.value, self.obtained_at, expires_at)


def unverified_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the server verifies; the client
    only needs to know when to refresh). ``None`` for anything that is not a JWT with ``exp``."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


class TokenSource:
    """Turns the user's ``token`` argument into fresh ``Token`` values."""

    def __init__(self, spec: TokenSpec) -> None:
        if spec is not None and not isinstance(spec, str) and not callable(spec):
            raise TypeError("token must be a string, a function returning one, or None")
        self._spec = spec

    @property
    def refreshable(self) -> bool:
        """Whether asking again can give a different token."""
        return callable(self._spec)

    async def get(self) -> Token | None:
        spec = self._spec
        if spec is None:
            return None
        if isinstance(spec, str):
            value = spec
        else:
            produced = spec()
            value = await produced if inspect.isawaitable(produced) else produced
            if not isinstance(value, str) or not value:
                raise TypeError(f"the token function returned {type(value).__name__}, not a token string")
        return Token(value, time.time(), unverified_expiry(value))
