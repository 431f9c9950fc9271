"""Durable job records in PostgreSQL (to be written)."""

from __future__ import annotations

from phasecast.errors import ConfigurationError
from phasecast.tracker import Archive


def open_archive(url: str) -> Archive:
    raise ConfigurationError("the PostgreSQL archive is not implemented yet")
