"""Redis engine: state with a TTL, bounded history, pub/sub fan-out across server processes.

One engine for a single Redis and for a Redis Cluster: the URL may name any node of a
cluster (a primary or a replica) and the engine finds out which it is (``INFO cluster``).

Writes are Lua scripts (``engines/lua/``): the compare-and-set on ``seq``, the TTL refresh,
the history append and the publish happen as one step, so two writers never interleave and
no watcher ever sees a change that was not stored. Every key a script touches carries the
job id as its hash tag (``engines/redis_keys.py``), so on a cluster each script runs on the
one shard that owns the job, and publishes with ``SPUBLISH`` (sharded pub/sub) there.

The cross-job indexes (per owner, all jobs) are separate keys written by separate commands
right after the job's own write: the job hash carries ``ix=0`` until its index entries are
written, and a later update of a job still marked so writes them again (idempotently), so a
crash between the two steps is repaired by the job's next update. Listing reads an index
(newest first by ``created_at``), then the jobs themselves, and drops entries whose job
expired or is not the owner's: it is exact for every job whose create was acknowledged.

The change feed (``engines/redis_feed.py``) holds one subscriber connection per node that
owns listened channels (one on a single Redis, one per shard primary on a cluster).

A primary with replicas watched by Redis Sentinel is named by the sentinels:
``redis+sentinel://[user:password@]host:port[,host:port…]/<service>[/<db>]`` (the
credentials are the data nodes'). Writes go to the primary the sentinels name (a
connection asks them again whenever it reconnects), and the feed follows the primary
across a failover the way it follows a restarted Redis (see ``redis_feed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qs, unquote, urlencode, urlsplit, urlunsplit

from phasecast.engines.base import (
    DEFAULT_HISTORY_LIMIT,
    Change,
    ChangeHandler,
    Decided,
    Ending,
    Engine,
    OtherJob,
    RuleInputs,
    check_successor,
    history_entry,
)
from phasecast.engines.redis_keys import RedisKeys
from phasecast.errors import (
    ConfigurationError,
    EngineUnavailable,
    InvalidUpdate,
    JobExists,
    JobNotFound,
    JobTerminal,
    PhasecastError,
)
from phasecast.model import (
    MAX_STEPS,
    WORKING_PHASES,
    JobState,
    Phase,
    ProgressUpdate,
    format_time,
    parse_time,
)
from phasecast.progress import LEARNING_RATE, PhaseStat, PhaseStats

try:
    import redis.asyncio as aioredis
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
    from redis.crc import key_slot
    from redis.exceptions import (
        AskError,
        AuthenticationError,
        BusyLoadingError,
        ClusterDownError,
        MasterDownError,
        MovedError,
        NoScriptError,
        ReadOnlyError,
        RedisClusterException,
        RedisError,
        ResponseError,
        TryAgainError,
    )

    from phasecast.engines.redis_feed import RedisFeed, encode_change
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ConfigurationError(
        "the Redis engine needs redis-py: pip install 'phasecast[redis]'"
    ) from exc

if TYPE_CHECKING:
    from phasecast.engines.redis_outbox import RedisArchiveOutbox
    from phasecast.engines.redis_panels import RedisPanelRecords

log = logging.getLogger("phasecast.engines.redis")

DEFAULT_TTL_SECONDS = 24 * 3600
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
POOL_SIZE = 64
POOL_WAIT_SECONDS = 10.0
# Write pipelines in flight at once (each on its own pooled connection).
MAX_PIPELINES = 4
# The fewest writes worth a pipeline of their own when one loop turn's writes are split.
MIN_PIPELINE = 8
SINGLE_NODE = "redis"

# A pooled connection idle for a second is checked with a PING before it is used, and may
# reconnect once: after a Redis restart, the first write does not fail on a connection the
# old server closed. That retry also sends a command again once when its connection failed
# before the reply arrived (so the command may have run): a create recognises its own
# earlier run by its fingerprint (insert.lua).
STALE_CONNECTION_CHECK: dict[str, Any] = {"health_check_interval": 1, "retry": Retry(NoBackoff(), 1)}

# Everything redis-py raises for a store it cannot use right now.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# How long a sentinel may take to answer where the primary is.
SENTINEL_TIMEOUT_SECONDS = 2.0
# How often the engine asks the sentinels whether the primary moved (a failover normally
# also closes every pub/sub connection of the demoted primary; this catches the rest).
PRIMARY_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    # The sentinels' own credentials (their requirepass / ACL user), which are not the data
    # nodes': ``?sentinel_password=…[&sentinel_username=…]``.
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, parts: SplitResult, query: dict[str, str] | None = None) -> SentinelTarget:
        """The target of ``parts``; ``sentinel_username`` and ``sentinel_password`` are taken
        out of ``query`` (the URL's other parameters)."""
        shape = (
            "redis+sentinel://[user:password@]host:port[,host:port...]/<service name>[/<db>]"
            "[?sentinel_password=...]"
        )
        query = {} if query is None else query
        sentinel_username = query.pop("sentinel_username", None) or None
        sentinel_password = query.pop("sentinel_password", None) or None
        if sentinel_username is not None and sentinel_password is None:
            raise ConfigurationError("sentinel_username needs sentinel_password too: the sentinels "
                                     "authenticate a user by its password")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username = password = None
        if userinfo:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        sentinels: list[tuple[str, int]] = []
        for item in hosts.split(","):
            item = item.strip()
            if item.startswith("["):  # [IPv6]:port
                host, _, rest = item[1:].partition("]")
                port_text = rest.removeprefix(":")
            else:
                host, _, port_text = item.partition(":")
            if not host:
                raise ConfigurationError(f"a sentinel address is empty; use {shape}")
            try:
                port = int(port_text) if port_text else SENTINEL_PORT
            except ValueError as exc:
                raise ConfigurationError(f"sentinel port {port_text!r} is not a number") from exc
            if not 0 < port < 65536:
                raise ConfigurationError(f"sentinel port {port} is out of range")
            sentinels.append((host, port))
        path = [unquote(p) for p in parts.path.split("/")[1:]]
        if not path or not path[0] or len(path) > 2:
            raise ConfigurationError(f"name the Sentinel service: {shape}")
        db = 0
        if len(path) == 2 and path[1] != "":
            if not path[1].isdigit():
                raise ConfigurationError(f"database {path[1]!r} is not a number; use {shape}")
            db = int(path[1])
        return cls(tuple(sentinels), path[0], db, username, password, sentinel_username, sentinel_password)

    def describe(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
        return f"{SENTINEL_SCHEME}://{hosts}/{self.service}/{self.db}"


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (connections to whichever node the sentinels name as
    primary) with the blocking behaviour of the engine's other pool: a burst waits for a
    free connection instead of failing once all are busy."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _number(value: float | None) -> str:
    """A float as the script reads it back exactly (repr round-trips), or '' for none."""
    return "" if value is None else repr(float(value))


def _report_fields(update: ProgressUpdate) -> list[Any]:
    """A report as apply.lua's ARGV 8-14."""
    return [
        update.phase.value,
        _number(update.phase_progress),
        update.step or "",
        _number(update.step_progress),
        update.step_status or "",
        "" if update.steps_total is None else update.steps_total,
        "" if update.message is None else _json_string(update.message),
    ]


# What json.dumps(ensure_ascii=False) escapes in a string; without any of it, the JSON of a
# string is the string in quotes (four times cheaper, measured, than json.dumps).
_ESCAPED = re.compile(r'[\x00-\x1f\\"]')


def _json_string(text: str) -> str:
    if _ESCAPED.search(text) is None:
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


class _SentAlone(Exception):
    """A cluster write whose pipeline reply was a redirection or an error of the node, or
    that could not be sent: it is sent again on its own through the cluster client. A
    marker, never raised to a caller."""

    @classmethod
    def of(cls, exc: ResponseError) -> ResponseError | _SentAlone:
        """A script's own error stays its answer; MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a
        read-only (demoted) node, one still loading or without its primary send it alone."""
        if isinstance(exc, _NODE_ERRORS):
            return cls(str(exc))
        return exc


_NODE_ERRORS = (MovedError, AskError, TryAgainError, ClusterDownError, ReadOnlyError,
                BusyLoadingError, MasterDownError)


def _pack_scripts(batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]) -> bytes:
    """``EVALSHA sha numkeys key… arg…`` for each entry, in the Redis protocol, as one
    buffer. Arguments are str or int, as the engine builds them.

    Built as one str, encoded once: a bulk string's length is its UTF-8 length. Most of a
    report's arguments repeat from report to report (keys, the expected owner and kind, the
    weights, the timestamp of the millisecond); their packed form is remembered
    (``_PACKED``), which took packing from 13 to 8 CPU-µs per report (32-report batches of reports that
    differ in time, progress and message; measured under load ~10)."""
    out: list[str] = []
    packed = _PACKED
    for script, keys, args, _ in batch:
        out.append(f"*{len(keys) + len(args) + 3}\r\n$7\r\nEVALSHA\r\n$40\r\n{script.sha}\r\n"
                   f"${len(str(len(keys)))}\r\n{len(keys)}\r\n")
        for value in (*keys, *args):
            piece = packed.get(value) if type(value) is str else None
            if piece is None:
                text = value if type(value) is str else str(value)
                size = len(text) if text.isascii() else len(text.encode())
                piece = f"${size}\r\n{text}\r\n"
                if type(value) is str:
                    if len(packed) >= _PACKED_MAX:
                        packed.clear()
                    packed[value] = piece
            out.append(piece)
    return "".join(out).encode()


# Script arguments in their packed form, by value (cleared when full).
_PACKED: dict[str, str] = {}
_PACKED_MAX = 4096


def _pack(command: tuple[str | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(command)]
    for value in command:
        data = str(value).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


DEFAULT_WAIT_TIMEOUT_MS = 500


def _replication_wait(query: dict[str, str]) -> tuple[int, int]:
    """``wait_replicas`` and ``wait_timeout_ms`` of the URL (removed from ``query``): every
    write's pipeline ends with ``WAIT <replicas> <timeout>``, and a write is acknowledged
    only once that many replicas have it. Off (0) by default."""
    try:
        replicas = int(query.pop("wait_replicas", "0"))
        timeout = int(query.pop("wait_timeout_ms", str(DEFAULT_WAIT_TIMEOUT_MS)))
    except ValueError as exc:
        raise ConfigurationError(
            "wait_replicas and wait_timeout_ms in the Redis URL must be whole numbers"
        ) from exc
    if replicas < 0 or timeout <= 0:
        raise ConfigurationError(
            "wait_replicas must be 0 (off) or more, and wait_timeout_ms a positive number of "
            "milliseconds (WAIT with no timeout could block writes for ever)"
        )
    return replicas, timeout


def _script(name: str) -> str:
    return resources.files("phasecast.engines").joinpath("lua", name).read_text()


class RedisEngine(Engine):
    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int | None = None,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        prefix: str | None = None,
    ) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            self.ttl_seconds = int(query.pop("ttl", ttl_seconds or DEFAULT_TTL_SECONDS))
        except ValueError as exc:
            raise ConfigurationError(f"ttl in {url!r} must be a number of seconds") from exc
        if self.ttl_seconds <= 0:
            raise ConfigurationError("ttl must be a positive number of seconds")
        self.keys = RedisKeys(prefix or query.pop("prefix", "phasecast"))
        self.history_limit = history_limit
        self.wait_replicas, self.wait_timeout_ms = _replication_wait(query)
        self.sentinel_target = (
            SentinelTarget.parse(parts, query) if parts.scheme == SENTINEL_SCHEME else None
        )
        for name in ("sentinel_username", "sentinel_password"):
            if name in query:
                raise ConfigurationError(f"{name} is for redis+sentinel:// URLs (the sentinels' "
                                         "credentials); this URL names Redis directly")
        self._sentinel: Sentinel | None = None
        self._primary = ""  # host:port of the primary, as the sentinels last named it
        self._primary_watch: asyncio.Task[None] | None = None
        self._connection_url = urlunsplit(parts._replace(query=urlencode(query)))
        self._client: aioredis.Redis | RedisCluster | None = None
        self.clustered = False
        self._feed: RedisFeed | None = None
        self._publish = "PUBLISH"
        self._replace_queue: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self._collecting = False  # a flusher is gathering this loop turn's writes
        self._pipelines = 0  # pipelines sent and not yet answered
        self._busy: dict[str, int] = {}  # first key of a write -> its writes in flight
        self._index_touched: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._idle_tags: dict[str, str] = {}
        self._expected: dict[tuple[str, str], str] = {}
        self._stamp: tuple[int, str] = (-1, "")
        self._numbers: dict[tuple[int, int], tuple[object, object, str, str]] = {}
        self.subscribe_timeout = SUBSCRIBE_TIMEOUT_SECONDS

    @property
    def client(self) -> Any:
        """The redis-py client: ``redis.asyncio.Redis``, or ``RedisCluster`` on a cluster
        (both take the same commands for keys of one slot)."""
        if self._client is None:
            raise EngineUnavailable("the Redis engine is not started")
        return self._client

    async def start(self, on_change: ChangeHandler | None = None) -> None:
        self._on_change = on_change
        self.clustered = self.sentinel_target is None and await self._is_cluster()
        if self.clustered and self.wait_replicas:
            raise ConfigurationError(
                "wait_replicas is not supported on a Redis Cluster yet (each write there is "
                "sent on its own, with no connection to send WAIT on after it)"
            )
        if self.sentinel_target is not None:
            self._client = self._sentinel_client(self.sentinel_target)
            await self._find_primary()
        elif self.clustered:
            self._client = self._cluster_client()
            self._publish = "SPUBLISH"
        else:
            # A blocking pool: a burst of requests (a reconnect storm of subscribers) waits
            # for a free connection instead of failing once all are busy.
            pool = aioredis.BlockingConnectionPool.from_url(
                self._connection_url,
                max_connections=POOL_SIZE,
                timeout=POOL_WAIT_SECONDS,
                decode_responses=True,
                socket_connect_timeout=5,
                **STALE_CONNECTION_CHECK,
            )
            self._client = aioredis.Redis(connection_pool=pool)
        self._insert = self._client.register_script(_script("insert.lua"))
        self._replace = self._client.register_script(_script("replace.lua"))
        self._learn = self._client.register_script(_script("learn.lua"))
        self._apply = self._client.register_script(self._apply_source())
        await self.ping()
        if on_change is not None:
            self._feed = self._make_feed()
            try:
                await self._feed.start(SUBSCRIBE_TIMEOUT_SECONDS)
            except TimeoutError as exc:
                await self._feed.stop()
                self._feed = None
                raise EngineUnavailable(
                    f"cannot open a pub/sub connection to {self._redacted_url()}"
                ) from exc
        if self.sentinel_target is not None:
            self._primary_watch = asyncio.create_task(
                self._watch_primary(), name="phasecast-sentinel-watch"
            )

    async def _is_cluster(self) -> bool:
        # Asked on database 0: a cluster node refuses SELECT of any other.
        parts = urlsplit(self._connection_url)
        tcp = parts.scheme != "unix"  # a unix socket URL's path is the socket, not a database
        probe = aioredis.Redis.from_url(
            urlunsplit(parts._replace(path="")) if tcp else self._connection_url,
            decode_responses=True, socket_connect_timeout=5,
        )
        try:
            info = await probe.info("cluster")
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(
                f"Redis at {self._redacted_url()} is unreachable: {exc}"
            ) from exc
        finally:
            await probe.aclose()
        if not info.get("cluster_enabled"):
            return False
        path = parts.path.strip("/") if tcp else ""
        if path not in ("", "0"):
            raise ConfigurationError(
                f"{self._redacted_url()} is a Redis Cluster node, and a cluster has only "
                "database 0: use redis://host:port/0 (or no database at all)"
            )
        return True

    def _cluster_client(self) -> RedisCluster:
        parts = urlsplit(self._connection_url)
        url = urlunsplit(parts._replace(path=""))
        return RedisCluster.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            max_connections=POOL_SIZE * 4,
            health_check_interval=STALE_CONNECTION_CHECK["health_check_interval"],
            # A command that met a moved slot, a failed node or a cluster still electing is
            # retried after redis-py re-read the slot map (about a second in all; past that
            # the caller gets EngineUnavailable, a 503).
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
        )

    def _sentinel_client(self, target: SentinelTarget) -> aioredis.Redis:
        """A client whose pooled connections go to the primary the sentinels name: each
        new connection asks them, and one that finds the node read-only (demoted) reconnects
        to the new primary. The stale-connection check and its one retry are as for a
        single Redis, so the first write after a failover finds the new primary."""
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels),
            sentinel_kwargs={
                "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
                "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
                "decode_responses": True,
                "username": target.sentinel_username,
                "password": target.sentinel_password,
            },
        )
        client: aioredis.Redis = self._sentinel.master_for(
            target.service,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT_SECONDS,
            **self._node_kwargs(target),
            health_check_interval=STALE_CONNECTION_CHECK["health_check_interval"],
            retry=STALE_CONNECTION_CHECK["retry"],
        )
        return client

    @staticmethod
    def _node_kwargs(target: SentinelTarget) -> dict[str, Any]:
        """Connection settings for the data nodes behind the sentinels."""
        return {
            "db": target.db,
            "username": target.username,
            "password": target.password,
            "decode_responses": True,
            "socket_connect_timeout": 5,
        }

    async def _find_primary(self) -> None:
        """Ask the sentinels which node is the primary now (the feed's topology refresh)."""
        assert self._sentinel is not None
        assert self.sentinel_target is not None
        try:
            host, port = await self._sentinel.discover_master(self.sentinel_target.service)
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(
                f"the sentinels at {self._redacted_url()} name no primary: {exc}"
                f"{await self._sentinel_auth_hint()}"
            ) from exc
        self._primary = f"{host}:{port}"

    async def _sentinel_auth_hint(self) -> str:
        """Why no sentinel answered, when it is their password: redis-py reports only that
        none named a primary."""
        assert self._sentinel is not None
        for sentinel in self._sentinel.sentinels:
            try:
                await sentinel.ping()
            except AuthenticationError:
                given = self.sentinel_target is not None and self.sentinel_target.sentinel_password
                refused = "the password given" if given else "to answer without a password"
                return (f"; the sentinels refused {refused}: set sentinel_password=<their requirepass> "
                        "(and sentinel_username= for an ACL user) in the URL's query")
            except REDIS_ERRORS as exc:
                if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                    return ("; the sentinels ask for a password: set sentinel_password=<their requirepass> "
                            "in the URL's query")
        return ""

    async def _watch_primary(self) -> None:
        """Ask the sentinels every second where the primary is; when it moved, tell the
        feed, which moves its subscriptions there and resyncs the jobs."""
        while True:
            await asyncio.sleep(PRIMARY_CHECK_SECONDS)
            before = self._primary
            with contextlib.suppress(EngineUnavailable):
                await self._find_primary()
            if self._primary == before:
                continue
            log.warning("the sentinels name a new primary: %s (was %s)", self._primary, before)
            # The write pool drops its idle connections to the old primary (redis-py does
            # so when it learns the new address), so the next writes go to the new one
            # rather than to a demoted node that may still accept them.
            with contextlib.suppress(*REDIS_ERRORS):
                await self.client.connection_pool.get_master_address()
            if self._feed is not None:
                self._feed.topology_changed()

    def _primary_connection(self, node: str) -> AbstractConnection:
        """A raw connection (no retries: see ``redis_feed``) to the primary ``node``."""
        assert self.sentinel_target is not None
        host, _, port = node.rpartition(":")
        connection = aioredis.Connection(
            host=host, port=int(port), retry=Retry(NoBackoff(), 0),
            **self._node_kwargs(self.sentinel_target),
        )
        return connection

    def _make_feed(self) -> RedisFeed:
        if self.sentinel_target is not None:
            return RedisFeed(
                sharded=False,
                channel_of=self.keys.channel,
                owner_of=lambda channel: self._primary,
                primaries=lambda: [self._primary],
                idle_channel=lambda node: self.keys.idle_channel("idle"),
                connect=self._primary_connection,
                refresh=self._find_primary,
                load=self._load_change,
                emit=self._emit,
            )
        if isinstance(self._client, RedisCluster):
            cluster = self._client
            return RedisFeed(
                sharded=True,
                channel_of=self.keys.channel,
                owner_of=lambda channel: cluster.nodes_manager.get_node_from_slot(
                    key_slot(channel.encode())
                ).name,
                primaries=self._slot_owners,
                idle_channel=self._idle_channel,
                connect=self._node_connection,
                refresh=self._refresh_topology,
                load=self._load_change,
                emit=self._emit,
            )
        single_url = self._connection_url
        return RedisFeed(
            sharded=False,
            channel_of=self.keys.channel,
            owner_of=lambda channel: SINGLE_NODE,
            primaries=lambda: [SINGLE_NODE],
            idle_channel=lambda node: self.keys.idle_channel("idle"),
            connect=lambda node: _raw_connection(single_url),
            refresh=_nothing,
            load=self._load_change,
            emit=self._emit,
        )

    # --- cluster topology (used by the feed) ---------------------------------------------

    def _slot_owners(self) -> list[str]:
        assert isinstance(self._client, RedisCluster)
        cache = self._client.nodes_manager.slots_cache
        return sorted({nodes[0].name for nodes in cache.values() if nodes})

    def _idle_channel(self, node: str) -> str:
        """A channel whose slot ``node`` owns (tags are tried in order until one lands)."""
        assert isinstance(self._client, RedisCluster)
        manager = self._client.nodes_manager
        known = self._idle_tags.get(node)
        candidates = [known] if known else []
        candidates += [str(i) for i in range(200_000)]
        for tag in candidates:
            channel = self.keys.idle_channel(tag)
            owner = manager.slots_cache.get(key_slot(channel.encode()))
            if owner and owner[0].name == node:
                self._idle_tags[node] = tag
                return channel
        raise EngineUnavailable(f"cluster node {node} owns no hash slot")

    def _node_connection(self, node: str) -> AbstractConnection:
        assert isinstance(self._client, RedisCluster)
        found = self._client.get_node(node_name=node)
        if found is None:
            raise EngineUnavailable(f"cluster node {node} is no longer known")
        kwargs = dict(found.connection_kwargs)
        kwargs["retry"] = Retry(NoBackoff(), 0)
        connection: AbstractConnection = found.connection_class(**kwargs)
        return connection

    async def _refresh_topology(self) -> None:
        assert isinstance(self._client, RedisCluster)
        await self._client.nodes_manager.initialize()

    async def _load_change(self, job_id: str) -> Change | None:
        raw = await self.client.hget(self.keys.job(job_id), "state")
        return None if raw is None else Change.of(JobState.from_json(raw), raw)

    # --- lifecycle -----------------------------------------------------------------------

    async def stop(self) -> None:
        # Let writes already queued finish (a retry may start another pipeline); they were
        # accepted by callers still waiting.
        while pending := [task for task in (*self._flushers, *self._background) if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._primary_watch is not None:
            self._primary_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._primary_watch
            self._primary_watch = None
        if self._feed is not None:
            await self._feed.stop()
            self._feed = None
        if self._sentinel is not None:
            await self._sentinel.aclose()
            self._sentinel = None
        if self._client is not None:
            if isinstance(self._client, RedisCluster):
                await self._client.aclose()
                # redis-py's aclose() closes nothing while the client is due to re-read the
                # slot map (after a command failed on a dead node, until the next command):
                # close every node's connections here too (closing twice is harmless).
                # Without this, a server stopped during a failover left its connections to
                # the live shards open ("unclosed transport" at garbage collection).
                await self._client.nodes_manager.aclose()
                await self._client.nodes_manager.aclose("startup_nodes")
            else:
                await self._client.aclose(close_connection_pool=True)
            self._client = None

    def _redacted_url(self) -> str:
        if self.sentinel_target is not None:
            return self.sentinel_target.describe()
        parts = urlsplit(self._connection_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc, query=""))

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"Redis at {self._redacted_url()} is unreachable: {exc}") from exc

    async def ready(self) -> None:
        await self.ping()
        if self._feed is not None and not self._feed.live:
            raise EngineUnavailable(
                f"the change feed from Redis is not live yet ({self._feed.status()})"
            )

    # --- writes --------------------------------------------------------------------------

    async def insert(self, state: JobState) -> None:
        state_json = state.to_json()
        try:
            created_new = await self._create(
                [self.keys.job(state.job_id), self.keys.history(state.job_id)],
                [
                    state_json,
                    state.seq,
                    self.ttl_seconds,
                    self.history_limit,
                    json.dumps(history_entry(state), separators=(",", ":")),
                    self.keys.channel(state.job_id),
                    encode_change(Change.of(state, state_json)),
                    int(state.terminal),
                    self._publish,
                    # This call's fingerprint: redis-py sends a command again when its reply
                    # was lost to a dropped connection (the cluster client after re-reading
                    # the slot map, the single client once), and the create may have run
                    # the first time. The second run recognises its own create (answer 2)
                    # instead of reporting the id taken by someone else.
                    secrets.token_hex(8),
                ],
            )
            if created_new == 0:
                raise JobExists(state.job_id)
            await self._index(state)
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot store job {state.job_id!r} in Redis: {exc}") from exc

    async def _create(self, keys: list[str], args: list[Any]) -> Any:
        """insert.lua; with ``wait_replicas``, in the write pipeline, so that its WAIT
        covers the create too."""
        if self.wait_replicas:
            return await self._batched_replace(keys, args, self._insert)
        return await self._insert(keys=keys, args=args)

    async def _index(self, state: JobState) -> None:
        """Write the job's entries in the cross-job indexes (idempotent), then mark it
        indexed. On a cluster these keys live on other shards than the job."""
        created = parse_time(state.created_at).timestamp()
        owner_index = self.keys.owner_index(state.owner)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(owner_index, {state.job_id: created})
            pipe.expire(owner_index, self.ttl_seconds)
            pipe.zadd(self.keys.all_jobs(), {state.job_id: created})
            await pipe.execute()
        await self.client.hset(self.keys.job(state.job_id), "ix", "1")
        self._index_touched[state.owner] = time.monotonic()

    async def replace(self, state: JobState, expected_seq: int) -> bool:
        check_successor(state, expected_seq)
        state_json = state.to_json()
        try:
            result = await self._batched_replace(
                [self.keys.job(state.job_id), self.keys.history(state.job_id)],
                [
                    expected_seq,
                    state_json,
                    state.seq,
                    self.ttl_seconds,
                    self.history_limit,
                    json.dumps(history_entry(state), separators=(",", ":")),
                    self.keys.channel(state.job_id),
                    encode_change(Change.of(state, state_json)),
                    int(state.terminal),
                    self._publish,
                ],
            )
            if result == 2:
                # Applied, and the job's index entries were never confirmed written (a
                # crash right after its create): write them now.
                await self._index(state)
                result = 1
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot update job {state.job_id!r} in Redis: {exc}") from exc
        if result == -2:
            current = await self.load(state.job_id)
            raise JobTerminal(state.job_id, current.phase if current else Phase.FAILED)
        if result == 1:
            self._keep_owner_index(state.owner)
        # -1: the job expired between read and write; the caller reloads and reports not found.
        return bool(result == 1)

    def _keep_owner_index(self, owner: str) -> None:
        """The owner index expires like the jobs it lists; a job that keeps being updated
        keeps its owner's index alive too (refreshed at most every tenth of the TTL)."""
        now = time.monotonic()
        if now - self._index_touched.get(owner, 0.0) < self.ttl_seconds / 10:
            return
        if len(self._index_touched) > 100_000:
            self._index_touched.clear()
        self._index_touched[owner] = now
        task = asyncio.get_running_loop().create_task(self._expire_owner_index(owner))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _expire_owner_index(self, owner: str) -> None:
        try:
            await self.client.expire(self.keys.owner_index(owner), self.ttl_seconds)
        except REDIS_ERRORS as exc:
            self._index_touched.pop(owner, None)
            log.warning("cannot extend the job index of an owner: %s", exc)

    async def _batched_replace(self, keys: list[str], args: list[Any], script: Any = None) -> Any:
        """Run the replace script, sharing one round trip with the other replaces issued
        meanwhile: concurrent writers (a batch of reports, many jobs) would otherwise each
        pay redis-py's per-command cost and a round trip. Each script still runs atomically
        on its own; only the network trip is shared.

        On a cluster (whose redis-py pipeline refuses scripts) the queued scripts are sent
        as one pipeline per shard primary, all at once."""
        return await self._queue_script(keys, args, script or self._replace)

    def _queue_script(self, keys: list[str], args: list[Any], script: Any) -> asyncio.Future[Any]:
        """Queue one script for the next pipeline; the future is its reply, or the
        exception it raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replace_queue.append((script, keys, args, future))
        self._start_flush()
        return future

    def _start_flush(self) -> None:
        """Start gathering this loop turn's writes into a pipeline, unless one is being
        gathered already or ``MAX_PIPELINES`` are waiting for their replies (then the next
        one starts when one of them is answered)."""
        if self._collecting or self._pipelines >= MAX_PIPELINES or not self._replace_queue:
            return
        self._collecting = True
        task = asyncio.get_running_loop().create_task(self._flush_replaces())
        self._flushers.add(task)
        task.add_done_callback(self._flushers.discard)

    def _sendable(self) -> list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]:
        """Take from the queue, in order, every write whose job has no write in a pipeline
        still unanswered (nor one held back earlier in the queue): the writes of one job
        are sent one pipeline after another, so Redis runs them in the order they were
        queued even though pipelines overlap. The rest stay queued, in order."""
        batch, held = [], []
        held_keys: set[str] = set()
        busy = self._busy
        for entry in self._replace_queue:
            key = entry[1][0]
            if key in busy or key in held_keys:
                held.append(entry)
                held_keys.add(key)
            else:
                batch.append(entry)
        self._replace_queue = held
        return batch

    async def _flush_replaces(self) -> None:
        try:
            await asyncio.sleep(0)  # let the writers of this loop turn queue theirs too
        finally:
            self._collecting = False
        batch = self._sendable()
        if not batch:
            return
        # Up to MAX_PIPELINES pipelines in flight: while Redis runs the scripts of one,
        # this process decides and answers the replies of another, instead of the two
        # taking turns (measured: one pipeline at a time capped ingest at 1 / (server +
        # Redis CPU per report); see docs/benchmarks.md, "Ingest: overlapping pipelines").
        # What one loop turn gathered is split too (by job, so that one job's writes stay
        # in one pipeline, in order): writers that are answered together write again
        # together, and one pipeline per turn would keep this process and Redis in
        # lock-step, each idle while the other works (see "Ingest: split pipelines").
        parts = self._split(batch)
        self._pipelines += len(parts)
        self._hold(batch)
        if len(parts) > 1:
            for part in parts[1:]:
                task = asyncio.get_running_loop().create_task(self._send_pipeline(part))
                self._flushers.add(task)
                task.add_done_callback(self._flushers.discard)
        await self._send_pipeline(parts[0])

    def _split(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]]:
        """``batch`` in parts, one per free pipeline but none meant to hold fewer than
        ``MIN_PIPELINE`` writes: jobs dealt to the parts in turn, every job's writes in
        one part, in their order (so a batch of few jobs makes few parts)."""
        count = min(MAX_PIPELINES - self._pipelines, len(batch) // MIN_PIPELINE)
        if count < 2:
            return [batch]
        parts: list[list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]] = [
            [] for _ in range(count)
        ]
        where: dict[str, int] = {}
        turn = 0
        for entry in batch:
            key = entry[1][0]
            k = where.get(key)
            if k is None:
                k = where[key] = turn
                turn = (turn + 1) % count
            parts[k].append(entry)
        return [part for part in parts if part]

    async def _send_pipeline(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        """One pipeline of ``batch`` (counted in ``_pipelines`` and held by the caller):
        sent, its writers answered, its jobs released."""
        alone: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]] = []
        try:
            try:
                if self.clustered:
                    results = await self._pipelined_on_shards(batch)
                else:
                    results = await self._pipelined_replaces(batch)
            except Exception as exc:  # a bug: every writer of the batch hears of it
                results = [exc] * len(batch)
            except BaseException:
                for entry in batch:
                    entry[3].cancel()
                raise
            for entry, result in zip(batch, results, strict=True):
                future = entry[3]
                if future.done():
                    continue
                if isinstance(result, NoScriptError | _SentAlone):
                    # A node that never saw the script (restarted, or a promoted replica),
                    # or a cluster write that met a moved slot or a failed node: sent
                    # again on its own (in order), which loads the script first. Its job
                    # stays held meanwhile: no later write of it overtakes the retry.
                    alone.append(entry)
                elif isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._pipelines -= 1
            retried = {id(entry) for entry in alone}
            self._release([entry for entry in batch if id(entry) not in retried])
        if alone:
            self._retry_alone(alone)

    def _hold(self, entries: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]) -> None:
        """Mark the jobs of ``entries`` as having writes in flight."""
        busy = self._busy
        for entry in entries:
            key = entry[1][0]
            busy[key] = busy.get(key, 0) + 1

    def _release(self, entries: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]) -> None:
        """``entries`` are answered: their jobs' next writes may go (in the next pipeline)."""
        busy = self._busy
        for entry in entries:
            key = entry[1][0]
            left = busy[key] - 1
            if left:
                busy[key] = left
            else:
                del busy[key]
        self._start_flush()

    async def _pipelined_replaces(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        """EVALSHA of each queued script, packed by hand and written at once on one pooled
        connection, then each reply read in order. Measured against redis-py's pipeline
        (pack_commands and the pipeline's per-command work were a quarter of a report's
        Python CPU): see docs/benchmarks.md, ingest. Not EVALSHA through ``script(client=
        pipe)`` either, which makes redis-py send a SCRIPT EXISTS round trip first: a node
        without the script answers NOSCRIPT, and that one write is retried on its own.

        Nothing is ever sent twice here: if the connection fails, the writes whose reply
        was not read get the error (their outcome is unknown to the caller, a 503)."""
        pool = self.client.connection_pool
        try:
            connection = await pool.get_connection()
        except REDIS_ERRORS as exc:
            return [exc] * len(batch)
        results: list[Any] = []
        try:
            # The health check (a PING on a connection idle for a second, which may
            # reconnect once) runs before anything of the batch is written.
            packed = _pack_scripts(batch)
            if self.wait_replicas:
                packed += _pack(("WAIT", self.wait_replicas, self.wait_timeout_ms))
            await connection.send_packed_command(packed, check_health=True)
            # One deadline for all the replies rather than redis-py's timer per reply
            # (a tenth of a batched report's Python CPU, measured with py-spy).
            deadline = (connection.socket_timeout or POOL_WAIT_SECONDS) + self.wait_timeout_ms / 1000
            acknowledged = self.wait_replicas
            async with asyncio.timeout(deadline):
                for _ in batch:
                    try:
                        results.append(await connection.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        results.append(exc)
                if self.wait_replicas:
                    acknowledged = int(await connection.read_response(timeout=math.inf))
            if acknowledged < self.wait_replicas:
                results = [
                    result if isinstance(result, BaseException)
                    else self._not_replicated(acknowledged)
                    for result in results
                ]
        except REDIS_ERRORS as exc:
            await connection.disconnect()
            # With wait_replicas, a reply read before the failure is not confirmed either.
            kept = 0 if self.wait_replicas else len(results)
            results = results[:kept] + [exc] * (len(batch) - kept)
        except BaseException:
            await connection.disconnect()  # replies may be left unread on it
            raise
        finally:
            await pool.release(connection)
        return results

    def _not_replicated(self, acknowledged: int) -> EngineUnavailable:
        return EngineUnavailable(
            f"the change was stored on the Redis primary, but {acknowledged} of the "
            f"{self.wait_replicas} replica(s) asked for (wait_replicas) confirmed it within "
            f"{self.wait_timeout_ms} ms: it could still be lost if the primary failed now. "
            "Sending it again is safe: a report or ending already stored is not applied twice"
        )

    async def _pipelined_on_shards(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        """On a cluster: the queued scripts grouped by the primary that owns their slot (as
        the client last knew the slot map), one hand-packed pipeline per primary, all at
        once; the scripts of one job share a slot, so they stay in order. A write that
        meets anything but a plain reply there (MOVED or ASK while a slot moves, a node
        down or electing) is answered ``_SentAlone``: it goes again on its own through
        redis-py's cluster client, which re-reads the slot map and retries, as every
        cluster write did before; one whose reply was lost with its connection may have
        run, and runs again harmlessly (a report or ending already stored is not applied
        twice, a replace whose base moved is refused, a create knows its fingerprint).
        Measured (in-process tracker, 3 primaries): 263 -> 66 Python CPU-us per report
        against one EVALSHA through the cluster client each."""
        cluster = self.client
        assert isinstance(cluster, RedisCluster)
        results: list[Any] = [None] * len(batch)
        groups: dict[str, tuple[Any, list[int]]] = {}
        for index, (_, keys, _, _) in enumerate(batch):
            try:
                node = cluster.nodes_manager.get_node_from_slot(key_slot(keys[0].encode()))
            except (*REDIS_ERRORS, KeyError, IndexError):
                results[index] = _SentAlone()
                continue
            groups.setdefault(node.name, (node, []))[1].append(index)

        async def send(node: Any, indices: list[int]) -> None:
            try:
                connection = node.acquire_connection()
            except REDIS_ERRORS:
                for index in indices:
                    results[index] = _SentAlone()
                return
            read = 0
            try:
                await connection.send_packed_command(
                    _pack_scripts([batch[i] for i in indices]), check_health=True
                )
                async with asyncio.timeout(connection.socket_timeout or POOL_WAIT_SECONDS):
                    for index in indices:
                        try:
                            reply = await connection.read_response(timeout=math.inf)
                        except ResponseError as exc:
                            reply = exc if isinstance(exc, NoScriptError) else _SentAlone.of(exc)
                        results[index] = reply
                        read += 1
            except REDIS_ERRORS:
                await connection.disconnect()
                for index in indices[read:]:
                    results[index] = _SentAlone()
            except BaseException:
                await connection.disconnect()  # replies may be left unread on it
                raise
            finally:
                node.release(connection)

        await asyncio.gather(*(send(node, indices) for node, indices in groups.values()))
        return results

    def _retry_alone(self, entries: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]) -> None:
        """Writes that met NOSCRIPT (or, on a cluster, anything ``_SentAlone`` stands for),
        in their order, while their jobs stay held (``_busy``): on a single Redis the
        scripts are loaded and the writes sent again as one pipeline (with its WAIT, if
        any); on a cluster each goes through redis-py's cluster client, which loads the
        script, follows redirections and retries. Before, a later write of the same job
        could be sent while the retry was still loading the script, and overtake it (the
        contract test of batches in flight together caught it on a cluster and with
        Sentinel)."""
        async def run() -> None:
            try:
                if self.clustered:
                    for script, keys, args, future in entries:
                        try:
                            result = await script(keys=keys, args=args)
                        except BaseException as exc:  # handed to the waiting writer
                            if not future.done():
                                future.set_exception(exc)
                            continue
                        if not future.done():
                            future.set_result(result)
                    return
                try:
                    for script in {id(entry[0]): entry[0] for entry in entries}.values():
                        await self.client.script_load(script.script)
                    results = await self._pipelined_replaces(entries)
                except BaseException as exc:  # handed to the waiting writers
                    results = [exc] * len(entries)
                for (_, _, _, future), result in zip(entries, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            finally:
                self._release(entries)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- one report, one round trip (apply.lua) ---------------------------------------

    def _apply_source(self) -> str:
        """apply.lua with this engine's constants written in: they do not travel with every
        call. The TTL is set again at most once per hundredth of it (the job then expires
        between 99% and 100% of the TTL after its last change)."""
        return (
            _script("apply.lua")
            .replace("__TTL__", str(int(self.ttl_seconds)))
            .replace("__REFRESH_MS__", str(int(self.ttl_seconds) * 10))
            .replace("__HISTORY__", str(int(self.history_limit)))
            .replace("__PUBLISH__", self._publish)
        )

    async def apply(
        self, job_id: str, update: ProgressUpdate, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        keys, args = self._step_args(job_id, now, inputs, _report_fields(update))
        decided = await self._step(
            job_id, inputs, self._batched_replace(keys, args, self._apply)
        )
        if decided is None:
            return await self.apply_by_compare_and_set(job_id, update, now, inputs)
        return decided

    async def apply_many(
        self, items: Sequence[tuple[str, ProgressUpdate, RuleInputs]], now: datetime
    ) -> list[Decided | OtherJob | PhasecastError]:
        """Every report's script queued at once, so that they share one pipeline (one per
        shard on a cluster), in the given order; each script still runs atomically on its
        own."""
        waiting: list[asyncio.Future[Any]] = []
        for job_id, update, inputs in items:
            keys, args = self._step_args(job_id, now, inputs, _report_fields(update))
            waiting.append(self._queue_script(keys, args, self._apply))
        results: list[Decided | OtherJob | PhasecastError] = []
        for (job_id, update, inputs), reply in zip(items, waiting, strict=True):
            try:
                decided = await self._step(job_id, inputs, reply)
                if decided is None:
                    decided = await self.apply_by_compare_and_set(job_id, update, now, inputs)
                results.append(decided)
            except PhasecastError as exc:
                results.append(exc)
        return results

    async def end(
        self, job_id: str, ending: Ending, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        error = ending.error
        fields: list[Any] = [
            ending.phase.value, "", "", "", "", "",
            json.dumps(ending.text, ensure_ascii=False),
        ]
        if error is not None:
            fields.append(json.dumps(error.to_dict(), separators=(",", ":"), ensure_ascii=False))
        keys, args = self._step_args(job_id, now, inputs, fields)
        decided = await self._step(
            job_id, inputs, self._batched_replace(keys, args, self._apply)
        )
        if decided is None:
            return await self.end_by_compare_and_set(job_id, ending, now, inputs)
        return decided

    def _step_args(
        self, job_id: str, now: datetime, inputs: RuleInputs, fields: list[Any]
    ) -> tuple[list[str], list[Any]]:
        """apply.lua's KEYS and ARGV (see the script)."""
        micros = (now - _EPOCH) // _MICROSECOND
        millis = micros // 1000
        if millis != self._stamp[0]:  # reports a millisecond apart share their timestamp
            self._stamp = (millis, format_time(now))
        expected = self._expected.get((inputs.kind, inputs.owner))
        if expected is None:
            if len(self._expected) > 4096:
                self._expected.clear()
            expected = self._expected[(inputs.kind, inputs.owner)] = (
                ',"owner":' + json.dumps(inputs.owner, ensure_ascii=False)
                + ',"kind":' + json.dumps(inputs.kind, ensure_ascii=False) + ',"phase":"'
            )
        weights, means = self._rule_numbers(inputs)
        args: list[Any] = [
            micros,
            self._stamp[1],
            # as encode_change writes changed_at and the job id
            f"|{millis // 1000}.{millis % 1000:03d}|{job_id}|",
            self.keys.channel(job_id),
            expected,
            weights,
            means,
            *fields,
        ]
        while args[-1] == "":  # the script reads a missing trailing argument as ''
            args.pop()
        return [self.keys.job(job_id), self.keys.history(job_id)], args

    def _rule_numbers(self, inputs: RuleInputs) -> tuple[str, str]:
        """The weights and learned means as the script reads them, remembered per (weights,
        stats) pair: the tracker hands the same objects again and again."""
        key = (id(inputs.weights), id(inputs.stats))
        known = self._numbers.get(key)
        if known is not None and known[0] is inputs.weights and known[1] is inputs.stats:
            return known[2], known[3]
        weights = ",".join(repr(float(inputs.weights.get(p, 0.0))) for p in WORKING_PHASES)
        means = ",".join(
            repr(stat.mean_seconds) if (stat := inputs.stats.get(p)) is not None else ""
            for p in WORKING_PHASES
        )
        if len(self._numbers) > 256:
            self._numbers.clear()
        # The objects are kept with their text, so their ids cannot be reused meanwhile.
        self._numbers[key] = (inputs.weights, inputs.stats, weights, means)
        return weights, means

    async def _step(
        self, job_id: str, inputs: RuleInputs, reply: Awaitable[Any]
    ) -> Decided | OtherJob | None:
        """apply.lua's ``reply`` as an answer; None when the stored state needs the Python
        rules instead."""
        try:
            result = await reply
            code = int(result[0])
            if code == 1:
                if result[2] == "0":
                    await self._index(JobState.from_json(str(result[1])))
                self._keep_owner_index(inputs.owner)
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot update job {job_id!r} in Redis: {exc}") from exc
        if code >= 0:
            return Decided(code == 1, result[1], int(result[3]), result[4], float(result[5]))
        if code == -1:
            raise JobNotFound(job_id)
        if code == -2:
            raise JobTerminal(job_id, Phase(result[1]))
        if code == -3:
            return OtherJob(str(result[1]), str(result[2]))
        if code == -4:
            raise InvalidUpdate("step", f"a phase may have at most {MAX_STEPS} steps")
        # -5: a stored state the script does not reproduce byte for byte (written by an
        # older version, say): decide it with the Python rules instead.
        return None

    # --- reads ---------------------------------------------------------------------------

    async def load(self, job_id: str) -> JobState | None:
        try:
            raw = await self.client.hget(self.keys.job(job_id), "state")
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot read job {job_id!r} from Redis: {exc}") from exc
        return None if raw is None else JobState.from_json(raw)

    async def load_many(self, job_ids: list[str]) -> list[JobState | None]:
        """``load`` of many jobs in one round trip (a pipeline): what the hub asks for when
        a reconnect storm subscribes to many jobs at once."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self.keys.job(job_id), "state")
                raws = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot read {len(job_ids)} jobs from Redis: {exc}") from exc
        return [None if raw is None else JobState.from_json(raw) for raw in raws]

    async def list_jobs(
        self, owner: str | None, *, active_only: bool, limit: int
    ) -> list[JobState]:
        index = self.keys.owner_index(owner) if owner is not None else self.keys.all_jobs()
        found: list[JobState] = []
        stale: list[str] = []
        start = 0
        page = max(limit, 50)
        try:
            while len(found) < limit:
                ids = [str(i) for i in await self.client.zrevrange(index, start, start + page - 1)]
                if not ids:
                    break
                start += page
                async with self.client.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hmget(self.keys.job(job_id), "state", "terminal")
                    rows = await pipe.execute()
                for job_id, (raw, terminal) in zip(ids, rows, strict=True):
                    if raw is None:
                        stale.append(job_id)  # the job expired before its index entry
                        continue
                    state = JobState.from_json(raw)
                    if owner is not None and state.owner != owner:
                        stale.append(job_id)  # the id expired and was taken by someone else
                    elif not (active_only and terminal == "1"):
                        found.append(state)
                        if len(found) == limit:
                            break
            if stale:
                await self.client.zrem(index, *stale)
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot list jobs in Redis: {exc}") from exc
        return found

    async def history(self, job_id: str, *, limit: int) -> list[dict[str, Any]]:
        try:
            entries = await self.client.xrevrange(self.keys.history(job_id), count=limit)
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot read history of {job_id!r}: {exc}") from exc
        return [json.loads(fields["e"]) for _, fields in reversed(entries or []) if fields]

    async def load_stats(self, kind: str) -> PhaseStats:
        try:
            raw = {str(k): str(v) for k, v in (await self.client.hgetall(self.keys.stats(kind))).items()}
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot read phase statistics: {exc}") from exc
        stats: PhaseStats = {}
        for phase in Phase:
            mean = raw.get(f"{phase.value}:mean")
            if mean is not None:
                stats[phase] = PhaseStat(float(mean), int(raw.get(f"{phase.value}:n", "1")))
        return stats

    async def record_durations(self, kind: str, durations: dict[Phase, float]) -> None:
        if not durations:
            return
        args: list[str | float] = [LEARNING_RATE]
        for phase, seconds in durations.items():
            args += [phase.value, seconds]
        try:
            await self._learn(keys=[self.keys.stats(kind)], args=args)
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot record phase durations: {exc}") from exc

    # --- plugins (engines/extensions.py) -------------------------------------------------

    def panel_records(self) -> RedisPanelRecords:
        from phasecast.engines.redis_panels import RedisPanelRecords

        return RedisPanelRecords(self)

    def archive_outbox(self) -> RedisArchiveOutbox:
        from phasecast.engines.redis_outbox import RedisArchiveOutbox

        return RedisArchiveOutbox(self)

    # --- fan-out -------------------------------------------------------------------------

    async def listen(self, job_id: str) -> None:
        if self._client is None or self._feed is None:
            raise EngineUnavailable(
                "the Redis engine was started without a change handler; its changes cannot be watched"
            )
        try:
            await self._feed.listen(job_id, self.subscribe_timeout)
        except TimeoutError as exc:
            raise EngineUnavailable(
                f"cannot watch job {job_id!r}: the subscription to Redis at "
                f"{self._redacted_url()} was not confirmed within {self.subscribe_timeout:g}s "
                "(the change feed is reconnecting); try again"
            ) from exc

    async def unlisten(self, job_id: str) -> None:
        if self._feed is not None:
            await self._feed.unlisten(job_id)


def _raw_connection(url: str) -> AbstractConnection:
    """One connection with no retries of its own (see ``redis_feed``)."""
    pool = aioredis.ConnectionPool.from_url(url, decode_responses=True, socket_connect_timeout=5)
    kwargs = dict(pool.connection_kwargs)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    connection: AbstractConnection = pool.connection_class(**kwargs)
    return connection


async def _nothing() -> None:
    return None
