"""JWT verification and the permissions a token grants."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from phasecast.config import Settings
from phasecast.errors import ConfigurationError, PhasecastError
from phasecast.model import JobState

VERIFIED_CACHE_SIZE = 4096
SCOPE_READ = "jobs:read"
SCOPE_WRITE = "jobs:write"
SCOPE_ADMIN = "admin"
KNOWN_SCOPES = (SCOPE_READ, SCOPE_WRITE, SCOPE_ADMIN)


class Unauthorized(PhasecastError):
    code = "unauthorized"


class Forbidden(PhasecastError):
    code = "forbidden"


@dataclass(slots=True, frozen=True)
class Principal:
    sub: str
    scopes: frozenset[str]
    expires_at: float

    @property
    def is_admin(self) -> bool:
        return SCOPE_ADMIN in self.scopes

    @property
    def is_worker(self) -> bool:
        """Workers and the platform's backend: may write any job and read any job."""
        return SCOPE_WRITE in self.scopes or self.is_admin

    @property
    def can_watch(self) -> bool:
        return bool(self.scopes & {SCOPE_READ, SCOPE_WRITE, SCOPE_ADMIN})

    def can_read(self, state: JobState) -> bool:
        return self.is_worker or (SCOPE_READ in self.scopes and state.owner == self.sub)

    def can_cancel(self, state: JobState) -> bool:
        return self.can_read(state)

    def require_read(self, state: JobState) -> None:
        if not self.can_read(state):
            raise Forbidden(f"job {state.job_id!r} belongs to another user")

    def require_read_scope(self) -> None:
        """For reads that are not about one job (listing): the same scope rule as
        ``can_read``, without an owner to compare."""
        if not (self.is_worker or SCOPE_READ in self.scopes):
            raise Forbidden(
                f"this needs a token with scope {SCOPE_READ!r}, {SCOPE_WRITE!r} or {SCOPE_ADMIN!r}"
            )

    def require_write(self) -> None:
        if not self.is_worker:
            raise Forbidden(f"this needs a token with scope {SCOPE_WRITE!r} or {SCOPE_ADMIN!r}")

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._verified: OrderedDict[str, Principal] = OrderedDict()
        self.algorithm = settings.jwt_algorithm
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.leeway = settings.jwt_leeway_seconds
        if self.algorithm.startswith("HS"):
            if not settings.jwt_secret:
                raise ConfigurationError(
                    "no JWT secret: set PHASECAST_JWT_SECRET (at least 32 bytes), or use "
                    "RS256/ES256 with PHASECAST_JWT_PUBLIC_KEY"
                )
            self._key: Any = settings.jwt_secret
        else:
            self._key = settings.key_material("jwt_public_key")

    def verify(self, token: str) -> Principal:
        """The principal a token proves. A token that verified before is answered from a
        bounded cache until it expires: checking a signature costs more than the rest of a
        progress report."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known.expires_at + self.leeway:
                return known
            del self._verified[token]
        principal = self._verify(token)
        self._verified[token] = principal
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise Unauthorized(f"the token is not a JWT: {exc}") from None
        algorithm = header.get("alg")
        if algorithm != self.algorithm:
            raise Unauthorized(
                f"token algorithm {algorithm!r} is not accepted; this server expects "
                f"{self.algorithm}"
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired; get a new one") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("the token's sub claim must be a non-empty string")
        return Principal(sub=sub, scopes=_scopes(claims.get("scope")), expires_at=float(claims["exp"]))


def _scopes(raw: object) -> frozenset[str]:
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(str(s) for s in raw)
    return frozenset()


def mint_token(
    settings: Settings, sub: str, scopes: Iterable[str], ttl_seconds: int = 3600
) -> str:
    """Sign a token with the server's configuration (development and tests)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_algorithm.startswith("HS"):
        if not settings.jwt_secret:
            raise ConfigurationError("set PHASECAST_JWT_SECRET to mint tokens")
        key: Any = settings.jwt_secret
    else:
        key = settings.key_material("jwt_private_key")
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithm)
