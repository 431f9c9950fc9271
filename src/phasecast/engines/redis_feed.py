"""The Redis change feed: every accepted change of a listened job, from Redis to this process.

One subscriber connection per Redis node that owns listened channels (one in all on a single
Redis, or to the primary a Sentinel names; one per shard primary on a cluster, with sharded
pub/sub), never one per job or per watcher. The feed is kept by reconciling what is wanted
(the listened jobs) with what is live (confirmed subscriptions on live connections):

* ``listen`` subscribes the job's channel on the connection of the node that owns it and
  returns once Redis has confirmed it, so a read made afterwards misses nothing.
* When a connection drops (Redis restarted, a primary died) or a node drops channels (a slot
  moved away: Redis sends an unsolicited ``sunsubscribe``), the affected jobs are marked and
  the reconciler takes over: it refreshes the cluster's slot map (or asks the sentinels
  which node is the primary now), subscribes each channel on
  its owner's connection (reconnecting with capped, jittered backoff) and, once confirmed,
  reloads every affected job from the stored state, retrying until each one is reloaded. A
  change published while the link was down is therefore delivered as the newest state.
* The feed is ``live`` only while nothing is pending; ``/readyz`` reports it.

Connections here are raw redis-py connections with no retry of their own: a silent
reconnect would resubscribe without anyone noticing that messages were missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import InvalidResponse, RedisClusterException, RedisError, ResponseError

from phasecast.backoff import backoff_delay
from phasecast.engines.base import Change
from phasecast.errors import EngineUnavailable

log = logging.getLogger("phasecast.engines.redis")

RECONNECT_BASE_SECONDS = 0.05
RECONNECT_CAP_SECONDS = 2.0
CONFIRM_TIMEOUT_SECONDS = 5.0
RELOAD_BATCH = 200

ConnectionFactory = Callable[[str], AbstractConnection]


# --- the pub/sub codec ----------------------------------------------------------------------


def encode_change(change: Change) -> str:
    """Compact transport form for pub/sub: header fields, then the state JSON."""
    return (
        f"{change.seq}|{int(change.terminal)}|{change.changed_at:.3f}|{change.job_id}|"
        f"{change.state_json}"
    )


def decode_change(payload: str) -> Change:
    seq, terminal, changed_at, job_id, state_json = payload.split("|", 4)
    return Change(job_id, int(seq), terminal == "1", state_json, float(changed_at))


# --- reading a subscriber connection -------------------------------------------------------

_MESSAGE_KINDS = frozenset(("message", "smessage"))


def _transport_of(connection: AbstractConnection) -> asyncio.Transport | None:
    """The connected socket's transport, once redis-py has done the connection's set-up
    (TLS, AUTH, HELLO, SELECT). redis-py keeps its ``StreamWriter`` in ``_writer``: not a
    public attribute, so it is checked, and the feed falls back to ``read_response`` if it
    is not there."""
    writer = getattr(connection, "_writer", None)
    if not isinstance(writer, asyncio.StreamWriter):
        return None
    return cast(asyncio.Transport, writer.transport)


def _reader_for(connection: AbstractConnection) -> hiredis.Reader:
    """A hiredis reply parser decoding as the connection does; error replies come back as
    ``ResponseError`` values, malformed input raises ``InvalidResponse``."""
    encoder = connection.encoder
    if encoder.decode_responses:
        return hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=ResponseError,
            encoding=encoder.encoding,
            errors=encoder.encoding_errors,
        )
    return hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)


class _PushReader(asyncio.Protocol):
    """Takes the subscriber connection's transport over from redis-py's stream protocol
    once the connection is set up: every chunk of bytes is parsed by hiredis and each
    complete reply handled in ``data_received``, with no task wake-up and no coroutine per
    reply. Writing (SUBSCRIBE/UNSUBSCRIBE through redis-py's ``send_command``) and closing
    still go through redis-py: flow control and the end of the connection are passed on to
    its protocol.

    Measured (``python -m bench.feed_read``, 2,000 changes/s over 100 jobs, CPU per change
    received): redis-py's ``read_response`` ~39 µs (each reply is a chain of coroutines
    under a timeout context, and its push handling formats every message for a debug log);
    a ``StreamReader`` read loop with this parser ~29 µs; this protocol: see
    docs/benchmarks.md, "Delivery path"."""

    def __init__(
        self,
        subscriber: _Subscriber,
        parser: hiredis.Reader,
        transport: asyncio.Transport,
        lost: asyncio.Future[BaseException],
    ) -> None:
        self._handle = subscriber.handle
        self._emit = subscriber.feed.emit
        self._parser = parser
        self._lost = lost
        self._stream_protocol = cast(asyncio.Protocol, transport.get_protocol())
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        if self._lost.done():
            return
        parser = self._parser
        handle = self._handle
        emit = self._emit
        try:
            parser.feed(data)
            reply = parser.gets()
            while reply is not False:
                # A message (nearly every reply), decoded and emitted here: what ``handle``
                # does with it, one call and a few checks less per change received.
                if type(reply) is list and len(reply) == 3 and reply[0] in _MESSAGE_KINDS:
                    emit(decode_change(reply[2]))
                else:
                    handle(reply)
                reply = parser.gets()
        except Exception as exc:  # the subscriber fails, and its jobs are reloaded
            if not isinstance(exc, (RedisError, OSError)):
                log.exception("handling a pub/sub message failed")
            self._lost.set_result(exc)

    def eof_received(self) -> bool | None:
        self._end(ConnectionError("the Redis server closed the pub/sub connection"))
        return self._stream_protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionError("the pub/sub connection was closed"))
        self._stream_protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._stream_protocol.pause_writing()

    def resume_writing(self) -> None:
        self._stream_protocol.resume_writing()

    def _end(self, exc: BaseException) -> None:
        if not self._lost.done():
            self._lost.set_result(exc)


# --- one subscriber connection --------------------------------------------------------------


class FeedLost(Exception):
    """A subscriber connection failed; its channels need the reconciler."""


class _Subscriber:
    """One raw connection in subscribe mode to one node, and a task reading it."""

    def __init__(self, feed: RedisFeed, node: str) -> None:
        self.feed = feed
        self.node = node
        self.channels: set[str] = set()  # confirmed (or being confirmed) here
        self.idle: str | None = None
        self.alive = False
        self._connection: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._leaving: dict[str, int] = {}  # our own unsubscribes not answered yet

    async def open(self) -> None:
        connection = self.feed.connect(self.node)
        await connection.connect()  # type: ignore[no-untyped-call]
        self._connection = connection
        self.alive = True
        # Taken over now, before any command is sent: nothing can be buffered unread yet.
        transport = _transport_of(connection)
        if transport is not None:
            lost: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
            _PushReader(self, _reader_for(connection), transport, lost)
            reading = self._wait_lost(lost)
        else:
            reading = self._read_replies(connection)
        self._reader = asyncio.create_task(reading, name=f"phasecast-feed-{self.node}")
        # A channel nobody publishes to: the connection is a subscriber from the start, and a
        # node that is reachable but idle is still known to be.
        self.idle = self.feed.idle_channel(self.node)
        await self.subscribe([self.idle])

    async def subscribe(self, channels: list[str]) -> None:
        """Subscribe and wait until Redis confirmed every channel."""
        if not channels:
            return
        if not self.alive or self._connection is None:
            raise FeedLost(f"subscriber to {self.node} is down")
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            future = self._confirm.get(channel)
            if future is None or future.done():
                future = loop.create_future()
                self._confirm[channel] = future
            waits.append(future)
            self.channels.add(channel)
        try:
            # One command per channel: on a cluster the channels of one node may span slots,
            # and one SSUBSCRIBE must name channels of a single slot.
            for channel in channels:
                await self._connection.send_command(
                    self.feed.subscribe_command, channel, check_health=False
                )
            async with asyncio.timeout(CONFIRM_TIMEOUT_SECONDS):
                await asyncio.gather(*(asyncio.shield(w) for w in waits))
        except (RedisError, OSError, TimeoutError) as exc:
            self.fail(exc)
            raise FeedLost(f"subscribe on {self.node} failed: {exc}") from exc

    async def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        if self.alive and self._connection is not None:
            self._leaving[channel] = self._leaving.get(channel, 0) + 1
            try:
                await self._connection.send_command(
                    self.feed.unsubscribe_command, channel, check_health=False
                )
            except (RedisError, OSError) as exc:
                self.fail(exc)

    async def _wait_lost(self, lost: asyncio.Future[BaseException]) -> None:
        """While ``_PushReader`` reads: the connection failed once this returns."""
        exc = await lost
        self.fail(exc)

    async def _read_replies(self, connection: AbstractConnection) -> None:
        """redis-py's own reader, reply by reply: for a connection whose transport could not
        be taken over (a redis-py that changed its internals)."""
        try:
            while True:
                reply = await connection.read_response(
                    timeout=math.inf, disconnect_on_error=False, push_request=True
                )
                self.handle(reply)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            self.fail(exc)

    def handle(self, reply: Any) -> None:
        """One reply from the node: a message, or the answer to a (un)subscribe."""
        if isinstance(reply, RedisError):
            # A refused subscribe (e.g. MOVED for a slot this node no longer owns).
            raise reply
        if not isinstance(reply, list) or len(reply) < 3:
            return
        kind = reply[0]
        if kind == "message" or kind == "smessage":
            self.feed.emit(decode_change(reply[2]))
        elif kind in ("subscribe", "ssubscribe"):
            future = self._confirm.pop(reply[1], None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind in ("unsubscribe", "sunsubscribe"):
            channel = reply[1]
            leaving = self._leaving.get(channel, 0)
            if leaving > 1:
                self._leaving[channel] = leaving - 1
            elif leaving == 1:
                del self._leaving[channel]
            elif channel in self.channels:
                # Not asked for: the node gave the channel's slot away (resharding,
                # or it became a replica). Find the new owner.
                self.channels.discard(channel)
                self.feed.moved(channel)

    def fail(self, exc: BaseException) -> None:
        if not self.alive:
            return
        self.alive = False
        log.warning("pub/sub connection lost (%s: %s); reconnecting", self.node, exc)
        for future in self._confirm.values():
            if not future.done():
                future.set_exception(FeedLost(str(exc)))
                future.exception()  # retrieved: nobody may be waiting on it any more
        self._confirm.clear()
        lost, self.channels = self.channels, set()
        self.feed.lost(self, lost)

    async def close(self) -> None:
        self.alive = False
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.disconnect()
            self._connection = None


# --- the feed -------------------------------------------------------------------------------


class RedisFeed:
    """Keeps one subscriber connection per node and the listened channels on their owners.

    ``owner_of(channel)`` names the node that owns a channel (always the same node on a
    single Redis); ``primaries()`` names every node to keep a connection to; ``refresh()``
    re-reads the cluster's slot map; ``connect(node)`` builds a raw connection to a node;
    ``load(job_id)`` reads a job's stored change for the resync.
    """

    def __init__(
        self,
        *,
        sharded: bool,
        channel_of: Callable[[str], str],
        owner_of: Callable[[str], str],
        primaries: Callable[[], list[str]],
        idle_channel: Callable[[str], str],
        connect: ConnectionFactory,
        refresh: Callable[[], Awaitable[None]],
        load: Callable[[str], Awaitable[Change | None]],
        emit: Callable[[Change], None],
    ) -> None:
        self.sharded = sharded
        self.subscribe_command = "SSUBSCRIBE" if sharded else "SUBSCRIBE"
        self.unsubscribe_command = "SUNSUBSCRIBE" if sharded else "UNSUBSCRIBE"
        self._channel_of = channel_of
        self._owner_of = owner_of
        self._primaries = primaries
        self.idle_channel = idle_channel
        self.connect = connect
        self._refresh = refresh
        self._load = load
        self.emit = emit
        self._listened: dict[str, str] = {}  # job id -> channel
        self._jobs_of: dict[str, str] = {}  # channel -> job id
        self._home: dict[str, _Subscriber] = {}  # channel -> where it is subscribed
        self._subscribers: dict[str, _Subscriber] = {}
        self._stray: set[str] = set()  # listened channels not (known to be) subscribed
        self._resync: set[str] = set()  # jobs to reload from the store
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}  # listens waiting for a channel
        self._wake = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._first_pass = asyncio.Event()
        self._topology_stale = False
        self.lost_at: float | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="phasecast-feed")
        self._wake.set()
        await asyncio.wait_for(self._first_pass.wait(), timeout)

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
            self._reconciler = None
        for subscriber in list(self._subscribers.values()):
            await subscriber.close()
        self._subscribers.clear()

    @property
    def live(self) -> bool:
        """Every listened job is subscribed on a live connection and was reloaded since
        its last gap; nothing is waiting for the reconciler."""
        return (
            self._first_pass.is_set()
            and not self._wake.is_set()
            and not self._stray
            and not self._resync
            and bool(self._subscribers)
            and all(s.alive for s in self._subscribers.values())
        )

    def status(self) -> str:
        return (
            f"{len(self._stray)} channels waiting to be subscribed, {len(self._resync)} jobs "
            f"waiting to be reloaded, {sum(not s.alive for s in self._subscribers.values())} "
            "connections down"
        )

    # --- listening ----------------------------------------------------------------------

    async def listen(self, job_id: str, timeout: float) -> None:
        """Return once the job's channel is confirmed subscribed; if the link is down, wait
        (at most ``timeout``) for the reconciler to restore it. On timeout the job is not
        listened to and ``TimeoutError`` is raised."""
        if job_id in self._listened and self._listened[job_id] in self._home:
            return
        channel = self._channel_of(job_id)
        self._listened[job_id] = channel
        self._jobs_of[channel] = job_id
        try:
            async with asyncio.timeout(timeout):
                try:
                    subscriber = self._subscriber_for(channel)
                    self._home[channel] = subscriber
                    await subscriber.subscribe([channel])
                    return
                except (RedisError, RedisClusterException, OSError, FeedLost) as exc:
                    log.info("subscribe to %s not confirmed (%s); waiting for the feed", channel, exc)
                    self._mark(channel)
                # The reconciler subscribes it once the link is back.
                while channel not in self._home:
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.setdefault(channel, []).append(waiter)
                    await waiter
        except TimeoutError:
            if self._listened.get(job_id) == channel:
                await self.unlisten(job_id)
            raise

    async def unlisten(self, job_id: str) -> None:
        channel = self._listened.pop(job_id, None)
        if channel is None:
            return
        self._jobs_of.pop(channel, None)
        self._stray.discard(channel)
        self._resync.discard(job_id)
        subscriber = self._home.pop(channel, None)
        if subscriber is not None:
            await subscriber.unsubscribe(channel)

    def _subscriber_for(self, channel: str) -> _Subscriber:
        node = self._owner_of(channel)
        subscriber = self._subscribers.get(node)
        if subscriber is None or not subscriber.alive:
            raise FeedLost(f"no live connection to {node} yet")
        return subscriber

    # --- what subscribers report --------------------------------------------------------

    def _mark(self, channel: str) -> None:
        if channel in self._jobs_of:
            self._stray.add(channel)
            self._home.pop(channel, None)
        self._wake.set()

    def moved(self, channel: str) -> None:
        log.info("channel %s moved away from its node; following it", channel)
        self._mark(channel)

    def topology_changed(self) -> None:
        """The nodes moved (a Sentinel named a new primary): re-read where they are and move
        every channel whose owner changed."""
        self._topology_stale = True
        self._wake.set()

    def lost(self, subscriber: _Subscriber, channels: set[str]) -> None:
        if self.lost_at is None:
            self.lost_at = asyncio.get_running_loop().time()
        for channel in channels:
            if self._home.get(channel) is subscriber:
                self._mark(channel)
        self._wake.set()

    # --- the reconciler -----------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                stale, self._topology_stale = self._topology_stale, False
                await self._reconcile(topology=stale or failures > 0 or bool(self._stray))
            except asyncio.CancelledError:
                raise
            except (RedisError, RedisClusterException, OSError, FeedLost, EngineUnavailable) as exc:
                failures += 1
                delay = backoff_delay(failures, base=RECONNECT_BASE_SECONDS, cap=RECONNECT_CAP_SECONDS)
                log.warning(
                    "change feed not restored (%s: %s); retrying in %.2fs",
                    type(exc).__name__, exc, delay,
                )
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            if failures or self.lost_at is not None:
                log.info("change feed restored after %d failed attempts", failures)
            failures = 0
            self.lost_at = None
            self._first_pass.set()

    async def _reconcile(self, *, topology: bool) -> None:
        if topology:
            await self._refresh()  # the slot map of a cluster; the primary a Sentinel names
        # Nodes that own listened channels, and every primary (an idle connection to each
        # tells us it is reachable).
        wanted_nodes = {self._owner_of(c) for c in self._jobs_of} | set(self._primaries())
        for node, subscriber in list(self._subscribers.items()):
            if not subscriber.alive or node not in wanted_nodes:
                # Dead, or no longer a primary: its channels find a new home below.
                for channel in subscriber.channels:
                    self._mark(channel)
                del self._subscribers[node]
                await subscriber.close()
        # Channels on a node that no longer owns them (a move we were not told of).
        for channel, home in list(self._home.items()):
            if self._owner_of(channel) != home.node:
                await home.unsubscribe(channel)
                self._mark(channel)
        self._wake.clear()  # what was marked so far is handled by this pass
        errors: list[BaseException] = []
        for node in sorted(wanted_nodes):
            try:
                await self._restore(node)
            except (RedisError, RedisClusterException, OSError, FeedLost, EngineUnavailable) as exc:
                errors.append(exc)  # other nodes go on; this one is retried
        await self._reload()
        if errors:
            raise FeedLost("; ".join(str(e) for e in errors))

    async def _restore(self, node: str) -> None:
        subscriber = self._subscribers.get(node)
        if subscriber is None:
            subscriber = _Subscriber(self, node)
            try:
                await subscriber.open()
            except BaseException:
                await subscriber.close()
                raise
            self._subscribers[node] = subscriber
        elif self.sharded:
            idle = self.idle_channel(node)  # its slot may have moved too
            if subscriber.idle != idle:
                subscriber.idle = idle
                await subscriber.subscribe([idle])
        channels = [c for c in self._stray if self._owner_of(c) == node]
        if not channels:
            return
        await subscriber.subscribe(channels)
        for channel in channels:
            job_id = self._jobs_of.get(channel)
            if job_id is not None and channel in self._stray:
                self._stray.discard(channel)
                self._home[channel] = subscriber
                self._resync.add(job_id)
                for waiter in self._waiters.pop(channel, []):
                    if not waiter.done():
                        waiter.set_result(None)

    async def _reload(self) -> None:
        """Reload every job whose changes may have been missed (a batch at a time); each
        one leaves the set only once it was read, so an error leaves the rest for the
        next attempt."""
        pending = [j for j in self._resync if j in self._listened]
        self._resync.intersection_update(pending)
        for start in range(0, len(pending), RELOAD_BATCH):
            batch = pending[start:start + RELOAD_BATCH]
            changes = await asyncio.gather(*(self._load(j) for j in batch))
            for job_id, change in zip(batch, changes, strict=True):
                if job_id in self._resync:
                    self._resync.discard(job_id)
                    if change is not None:
                        self.emit(change)

    @property
    def listened(self) -> dict[str, str]:
        return self._listened

    def describe(self) -> dict[str, Any]:
        return {
            "connections": {n: len(s.channels) for n, s in self._subscribers.items()},
            "stray": len(self._stray),
            "resync": len(self._resync),
        }
