"""Settings of the RunPod integration, read from ``PHASECAST_RUNPOD_*`` (and
``PHASECAST_WEBHOOK_SECRET``) by the integration itself: the core server settings know
nothing of RunPod."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from phasecast.config import Settings, _coerce
from phasecast.errors import ConfigurationError

ENV_NAMES = {"webhook_secret": "PHASECAST_WEBHOOK_SECRET"}  # every other: PHASECAST_RUNPOD_<NAME>
SECONDS = ("poll_interval", "queue_poll_interval", "max_poll_interval", "lease_seconds",
           "request_timeout", "not_found_grace", "job_ttl")


@dataclass(slots=True, frozen=True)
class RunPodSettings:
    endpoint: str | None = None
    api_key: str | None = None
    base_url: str = "https://api.runpod.ai/v2"
    # Signs webhook URLs; derived from the JWT secret when not set.
    webhook_secret: str | None = None
    # Seconds. The defaults suit production; tests make them small.
    poll_interval: float = 2.0  # while IN_PROGRESS: progress shows up only in /status
    queue_poll_interval: float = 5.0  # while IN_QUEUE: nothing changes quickly
    max_poll_interval: float = 30.0  # cap of the backoff after errors and 429s
    lease_seconds: float = 15.0  # another instance takes a panel over this long after its poller died
    request_timeout: float = 10.0
    max_retries: int = 2  # default for the "retry" failure policy
    # A /status 404 fails the panel only once it has been confirmed this long (3 answers at least).
    not_found_grace: float = 6.0
    # RunPod drops a job this long after /run (its execution policy ``ttl``): the longest a
    # submission whose answer was lost in a crash can still show up through its webhook.
    job_ttl: float = 3600.0

    @property
    def configured(self) -> bool:
        return bool(self.endpoint)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RunPodSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = ENV_NAMES.get(f.name, f"PHASECAST_RUNPOD_{f.name.upper()}")
            raw = env.get(name)
            if raw is not None:
                values[f.name] = _coerce(name.removeprefix("PHASECAST_").lower(), f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        found = cls(**values)
        found.check()
        return found

    def check(self) -> None:
        for name in SECONDS:
            if not 0 < getattr(self, name) <= (7 * 24 * 3600 if name == "job_ttl" else 3600):
                raise ConfigurationError(
                    f"PHASECAST_RUNPOD_{name.upper()} must be a number of seconds above 0 "
                    f"and at most {'604800' if name == 'job_ttl' else '3600'}"
                )
        if not 0 <= self.max_retries <= 10:
            raise ConfigurationError("PHASECAST_RUNPOD_MAX_RETRIES must be from 0 to 10")
        if self.endpoint and not self.api_key:
            raise ConfigurationError(
                "PHASECAST_RUNPOD_ENDPOINT is set but PHASECAST_RUNPOD_API_KEY is not; set both"
            )

    def public_url(self, core: Settings) -> str:
        """Where RunPod reaches this server (webhook URLs)."""
        return core.public_url or f"http://{core.host}:{core.port}"
