"""Server settings: defaults, overridden by ``PHASECAST_*`` environment variables, overridden
by command-line options."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phasecast.engines import DEFAULT_ENGINE_URL
from phasecast.errors import ConfigurationError

SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256")


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = DEFAULT_ENGINE_URL
    # JWT verification: a shared secret for HS*, or a PEM public key (text or file path)
    # for RS256/ES256. ``jwt_private_key`` is only for ``phasecast token`` with RS/ES.
    jwt_secret: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_public_key: str | None = None
    jwt_private_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_seconds: float = 30.0
    weights: str | None = None  # JSON: {"kind": {"PHASE": weight}}
    ping_interval: float = 15.0
    sse_retry_ms: int = 2000
    # "raw": SSE streams write straight to the socket when the server offers it (phasecast
    # serve does, server/sse_transport.py); "asgi": every event goes through ASGI send.
    sse_transport: str = "raw"
    ws_auth_timeout: float = 10.0
    # "raw": /v1/ws writes pre-encoded frames straight to sockets (server/rawws.py);
    # "asgi": the same server, /v1/ws through plain ASGI as on any other ASGI server.
    ws_transport: str = "raw"
    # "raw": progress reports are answered by the HTTP protocol itself (phasecast serve,
    # server/ingest.py); "asgi": by the thin ASGI layer, as on any other ASGI server.
    ingest_transport: str = "raw"
    max_subscriptions: int = 100
    log_json: bool = False
    log_level: str = "info"
    cors_origins: list[str] = field(default_factory=list)
    # Where RunPod (or anything else) reaches this server from outside; used in webhook URLs.
    public_url: str | None = None
    # Request body caps in bytes, enforced while the body streams in (413 beyond). Reports
    # are small; a create carries up to 16 KiB of metadata; a batch up to 500 reports.
    # Routes without a cap of their own (integrations, the webhook) get max_body_bytes.
    max_report_body_bytes: int = 32 * 1024
    max_create_body_bytes: int = 32 * 1024
    max_batch_body_bytes: int = 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    # Seconds a request may take to arrive: its headers from the first byte of the request
    # (or from the connection opening), its body from the end of its headers. Past it the
    # server answers 408 ``request_timeout`` with ``Connection: close`` (or just closes, if
    # no byte of a request came) and stores nothing.
    request_timeout: float = 30.0
    archive: str | None = None  # postgresql://… for durable job records
    demo: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"PHASECAST_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.jwt_algorithm not in SUPPORTED_ALGORITHMS:
            raise ConfigurationError(
                f"PHASECAST_JWT_ALGORITHM={self.jwt_algorithm!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_ALGORITHMS)}"
            )
        if (
            self.jwt_algorithm.startswith("HS")
            and self.jwt_secret is not None
            and len(self.jwt_secret.encode()) < 32
        ):
            raise ConfigurationError(
                "PHASECAST_JWT_SECRET must be at least 32 bytes for HMAC signing; generate one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if self.jwt_algorithm[:2] in ("RS", "ES") and self.jwt_public_key is None:
            raise ConfigurationError(
                f"{self.jwt_algorithm} needs PHASECAST_JWT_PUBLIC_KEY (PEM text or a file path)"
            )
        if self.ws_transport not in ("raw", "asgi"):
            raise ConfigurationError("ws_transport must be 'raw' or 'asgi'")
        if self.ingest_transport not in ("raw", "asgi"):
            raise ConfigurationError("ingest_transport must be 'raw' or 'asgi'")
        if self.sse_transport not in ("raw", "asgi"):
            raise ConfigurationError("sse_transport must be 'raw' or 'asgi'")
        if not 0 < self.ping_interval <= 300:
            raise ConfigurationError("ping_interval must be between 0 and 300 seconds")
        if not 0 < self.request_timeout <= 3600:
            raise ConfigurationError("request_timeout must be between 0 and 3600 seconds")
        for name in ("max_report_body_bytes", "max_create_body_bytes", "max_batch_body_bytes",
                     "max_body_bytes"):
            if not 1024 <= getattr(self, name) <= 1024 ** 3:
                raise ConfigurationError(
                    f"PHASECAST_{name.upper()} must be a number of bytes from 1024 to 1073741824"
                )

    def body_limits(self) -> dict[str, int]:
        """Body caps by REST route name; other routes get ``max_body_bytes``."""
        report = self.max_report_body_bytes
        return {
            "create_job": self.max_create_body_bytes,
            "report_progress": report,
            "complete_job": report,
            "fail_job": report,
            "cancel_job": report,
            "report_progress_batch": self.max_batch_body_bytes,
        }

    def largest_body_limit(self) -> int:
        return max(self.max_body_bytes, *self.body_limits().values())

    def key_material(self, which: str) -> str:
        """The PEM text of ``jwt_public_key`` or ``jwt_private_key``, read from a file if it
        names one."""
        value = getattr(self, which)
        if value is None:
            raise ConfigurationError(f"{which} is not configured")
        text = str(value)
        if "-----BEGIN" not in text:
            path = Path(text).expanduser()
            if not path.is_file():
                raise ConfigurationError(f"{which}: {text!r} is neither PEM text nor a file")
            text = path.read_text()
        return text


def _coerce(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("list"):
            return [part.strip() for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ConfigurationError(
            f"PHASECAST_{name.upper()}={raw!r} is not a valid {kind.split('[')[0]}"
        ) from None
    return raw
