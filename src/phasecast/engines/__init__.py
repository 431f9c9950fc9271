"""Storage engines, chosen by URL scheme: ``sqlite:///file.db`` (default) or ``redis://…``
(a single Redis, or any node of a Redis Cluster: the engine finds out which)."""

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
    if scheme in ("redis+sentinel", "rediss+sentinel", "sentinel"):
        raise ConfigurationError(
            f"{scheme}:// URLs are not supported yet: point the engine at the Redis primary "
            "(redis://host:6379/0), or run Redis as a cluster and name any of its nodes"
        )
    raise ConfigurationError(
        f"unknown engine URL {url!r}: use sqlite:///path.db, redis://host:6379/0 (a single "
        "Redis or any node of a Redis Cluster) or rediss://…"
    )
