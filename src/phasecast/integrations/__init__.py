"""Integrations with generation backends, attached to the server as startup hooks."""

from __future__ import annotations

from phasecast.config import Settings
from phasecast.server.app import Startup


def startup_hooks(settings: Settings) -> list[Startup]:
    """The hooks that the configured integrations need (none yet)."""
    return []
