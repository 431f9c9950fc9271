"""Storage engines, chosen by URL scheme: ``sqlite:///file.db`` (default) or ``redis://…``."""

from __future__ import annotations

from urllib.parse import urlsplit

from phasecast.engines.base import Change, ChangeFeed, ChangeHandler, Engine, JobStore
from phasecast.errors import ConfigurationError

DEFAULT_ENGINE_URL = "sqlite:///phasecast.db"

__all__ = [
    "DEFAULT_ENGINE_URL",
    "Change",
    "ChangeFeed",
    "ChangeHandler",
    "Engine",
    "JobStore",
    "open_engine",
]


def open_engine(url: str) -> Engine:
    """Build the engine for ``url`` (not started). Drivers load only when their scheme is used,
    so the embedded engine needs nothing beyond the standard library."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from phasecast.engines.sqlite import SQLiteEngine

        return SQLiteEngine(url)
    if scheme in ("redis", "rediss", "unix"):
        from phasecast.engines.redis import RedisEngine

        return RedisEngine(url)
    raise ConfigurationError(
        f"unknown engine URL {url!r}: use sqlite:///path.db, redis://host:6379/0 or rediss://…"
    )
