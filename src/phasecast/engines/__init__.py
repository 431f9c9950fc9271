"""Storage engines, chosen by URL scheme: ``sqlite:///file.db`` (default), ``redis://…``
(a single Redis, or any node of a Redis Cluster: the engine finds out which) or
``redis+sentinel://…`` (a primary and replicas watched by Redis Sentinel)."""

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
    if scheme in ("redis", "rediss", "unix", "redis+sentinel"):
        from phasecast.engines.redis import RedisEngine

        return RedisEngine(url)
    if scheme in ("rediss+sentinel", "sentinel"):
        raise ConfigurationError(
            f"{scheme}:// URLs are not supported: name the sentinels with "
            "redis+sentinel://host:26379[,host:26379...]/<service name>[/<db>] (TLS to "
            "sentinels is not supported yet)"
        )
    raise ConfigurationError(
        f"unknown engine URL {url!r}: use sqlite:///path.db, redis://host:6379/0 (a single "
        "Redis or any node of a Redis Cluster), rediss://… or "
        "redis+sentinel://host:26379[,host:26379...]/<service name>[/<db>]"
    )
