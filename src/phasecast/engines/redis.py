"""Redis engine: state with a TTL, bounded history, pub/sub fan-out across server processes.

Writes are Lua scripts (``engines/lua/``): the compare-and-set on ``seq``, the TTL refresh,
the history append and the PUBLISH happen as one step, so two writers never interleave and
no watcher ever sees a change that was not stored.

Each server process holds exactly one pub/sub connection. A job's channel is subscribed when
its first local watcher arrives and unsubscribed when its last one leaves. If that connection
drops, the listener reconnects with capped exponential backoff, subscribes again and reloads
every listened job from the stored state, so a change published while it was away is not
missed: watchers receive the newest state instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from phasecast.backoff import backoff_delay
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
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ConfigurationError(
        "the Redis engine needs redis-py: pip install 'phasecast[redis]'"
    ) from exc

if TYPE_CHECKING:
    from phasecast.engines.redis_outbox import RedisArchiveOutbox
    from phasecast.engines.redis_panels import RedisPanelRecords

log = logging.getLogger("phasecast.engines.redis")

DEFAULT_TTL_SECONDS = 24 * 3600
RECONNECT_BASE_SECONDS = 0.1
RECONNECT_CAP_SECONDS = 5.0
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
POOL_SIZE = 64
POOL_WAIT_SECONDS = 10.0


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _number(value: float | None) -> str:
    """A float as the script reads it back exactly (repr round-trips), or '' for none."""
    return "" if value is None else repr(float(value))


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
        self._connection_url = urlunsplit(parts._replace(query=urlencode(query)))
        self._client: aioredis.Redis | None = None
        self._listened: set[str] = set()
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._connected = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._replace_queue: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]] = []
        self._replace_flusher: asyncio.Task[None] | None = None
        self.subscribe_timeout = SUBSCRIBE_TIMEOUT_SECONDS

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise EngineUnavailable("the Redis engine is not started")
        return self._client

    async def start(self, on_change: ChangeHandler | None = None) -> None:
        self._on_change = on_change
        # A blocking pool: a burst of requests (a reconnect storm of subscribers) waits for a
        # free connection instead of failing once all are busy.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._connection_url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._insert = self._client.register_script(_script("insert.lua"))
        self._replace = self._client.register_script(_script("replace.lua"))
        self._learn = self._client.register_script(_script("learn.lua"))
        self._apply = self._client.register_script(_script("apply.lua"))
        await self.ping()
        if on_change is not None:
            self._listener = asyncio.create_task(self._listen_forever(), name="phasecast-pubsub")
            try:
                await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_TIMEOUT_SECONDS)
            except TimeoutError as exc:
                raise EngineUnavailable(
                    f"cannot open a pub/sub connection to {self._redacted_url()}"
                ) from exc

    async def stop(self) -> None:
        if self._replace_flusher is not None:
            # Let writes already queued finish; they were accepted by callers still waiting.
            with contextlib.suppress(Exception):
                await self._replace_flusher
            self._replace_flusher = None
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._client is not None:
            await self._client.aclose(close_connection_pool=True)
            self._client = None

    def _redacted_url(self) -> str:
        parts = urlsplit(self._connection_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc, query=""))

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"Redis at {self._redacted_url()} is unreachable: {exc}") from exc

    # --- writes --------------------------------------------------------------------------

    async def insert(self, state: JobState) -> None:
        state_json = state.to_json()
        change = Change.of(state, state_json)
        created = parse_time(state.created_at).timestamp()
        try:
            created_new = await self._insert(
                keys=[
                    self.keys.job(state.job_id),
                    self.keys.history(state.job_id),
                    self.keys.owner_index(state.owner),
                    self.keys.all_jobs(),
                ],
                args=[
                    state_json,
                    state.seq,
                    self.ttl_seconds,
                    self.history_limit,
                    json.dumps(history_entry(state), separators=(",", ":")),
                    self.keys.channel(state.job_id),
                    change.encode(),
                    state.job_id,
                    created,
                    int(state.terminal),
                ],
            )
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"cannot store job {state.job_id!r} in Redis: {exc}") from exc
        if created_new == 0:
            raise JobExists(state.job_id)

    async def replace(self, state: JobState, expected_seq: int) -> bool:
        check_successor(state, expected_seq)
        state_json = state.to_json()
        try:
            result = await self._batched_replace(
                [
                    self.keys.job(state.job_id),
                    self.keys.history(state.job_id),
                    self.keys.owner_index(state.owner),
                ],
                [
                    expected_seq,
                    state_json,
                    state.seq,
                    self.ttl_seconds,
                    self.history_limit,
                    json.dumps(history_entry(state), separators=(",", ":")),
                    self.keys.channel(state.job_id),
                    Change.of(state, state_json).encode(),
                    int(state.terminal),
                ],
            )
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"cannot update job {state.job_id!r} in Redis: {exc}") from exc
        if result == -2:
            current = await self.load(state.job_id)
            raise JobTerminal(state.job_id, current.phase if current else Phase.FAILED)
        # -1: the job expired between read and write; the caller reloads and reports not found.
        return bool(result == 1)

    async def _batched_replace(self, keys: list[str], args: list[Any], script: Any = None) -> Any:
        """Run the replace script, sharing one round trip with the other replaces issued
        meanwhile: concurrent writers (a batch of reports, many jobs) would otherwise each
        pay redis-py's per-command cost and a round trip. Each script still runs atomically
        on its own; only the network trip is shared."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replace_queue.append((script or self._replace, keys, args, future))
        if self._replace_flusher is None or self._replace_flusher.done():
            self._replace_flusher = asyncio.create_task(self._flush_replaces())
        return await future

    async def _flush_replaces(self) -> None:
        while self._replace_queue:
            await asyncio.sleep(0)  # let the writers of this loop turn queue theirs too
            batch, self._replace_queue = self._replace_queue, []
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        await script(keys=keys, args=args, client=pipe)
                    results = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                results = [exc] * len(batch)
            for (_, _, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    # --- one report, one round trip (apply.lua) ---------------------------------------

    async def apply(
        self, job_id: str, update: ProgressUpdate, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        fields: list[Any] = [
            update.phase.value,
            _number(update.phase_progress),
            update.step or "",
            _number(update.step_progress),
            update.step_status or "",
            "" if update.steps_total is None else update.steps_total,
            "" if update.message is None else json.dumps(update.message, ensure_ascii=False),
        ]
        decided = await self._step(job_id, now, inputs, fields)
        if decided is None:
            return await self.apply_by_compare_and_set(job_id, update, now, inputs)
        return decided

    async def end(
        self, job_id: str, ending: Ending, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        error = ending.error
        fields: list[Any] = [
            ending.phase.value, "", "", "", "", "",
            json.dumps(ending.text, ensure_ascii=False),
            "" if error is None else json.dumps(error.to_dict(), separators=(",", ":"), ensure_ascii=False),
        ]
        decided = await self._step(job_id, now, inputs, fields)
        if decided is None:
            return await self.end_by_compare_and_set(job_id, ending, now, inputs)
        return decided

    async def _step(
        self, job_id: str, now: datetime, inputs: RuleInputs, fields: list[Any]
    ) -> Decided | OtherJob | None:
        """Run apply.lua; None when the stored state needs the Python rules instead."""
        stamp = format_time(now)
        args: list[Any] = [
            (now - _EPOCH) // _MICROSECOND,
            stamp,
            f"{parse_time(stamp).timestamp():.3f}",
            self.ttl_seconds,
            self.history_limit,
            self.keys.channel(job_id),
            inputs.kind,
            inputs.owner,
            ",".join(repr(float(inputs.weights.get(p, 0.0))) for p in WORKING_PHASES),
            ",".join(
                repr(stat.mean_seconds) if (stat := inputs.stats.get(p)) is not None else ""
                for p in WORKING_PHASES
            ),
            *fields,
        ]
        keys = [
            self.keys.job(job_id),
            self.keys.history(job_id),
            self.keys.owner_index(inputs.owner),
        ]
        try:
            result = await self._batched_replace(keys, args, self._apply)
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"cannot update job {job_id!r} in Redis: {exc}") from exc
        code = int(result[0])
        if code >= 0:
            return Decided(code == 1, str(result[1]))
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
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"cannot read job {job_id!r} from Redis: {exc}") from exc
        return None if raw is None else JobState.from_json(raw)

    async def list_jobs(
        self, owner: str | None, *, active_only: bool, limit: int
    ) -> list[JobState]:
        index = self.keys.owner_index(owner) if owner is not None else self.keys.all_jobs()
        found: list[JobState] = []
        expired: list[str] = []
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
                        expired.append(job_id)
                    elif not (active_only and terminal == "1"):
                        found.append(JobState.from_json(raw))
                        if len(found) == limit:
                            break
            if expired:
                # Index entries outlive the jobs they name (the job's TTL expired first).
                await self.client.zrem(index, *expired)
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"cannot list jobs in Redis: {exc}") from exc
        return found

    async def history(self, job_id: str, *, limit: int) -> list[dict[str, Any]]:
        try:
            entries = await self.client.xrevrange(self.keys.history(job_id), count=limit)
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"cannot read history of {job_id!r}: {exc}") from exc
        return [json.loads(fields["e"]) for _, fields in reversed(entries or []) if fields]

    async def load_stats(self, kind: str) -> PhaseStats:
        try:
            raw = {str(k): str(v) for k, v in (await self.client.hgetall(self.keys.stats(kind))).items()}
        except (RedisError, OSError) as exc:
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
        except (RedisError, OSError) as exc:
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
        if job_id in self._listened:
            return
        if self._client is None or self._listener is None:
            raise EngineUnavailable(
                "the Redis engine was started without a change handler; its changes cannot be watched"
            )
        # Listened from now on: if the link drops before the subscription is confirmed, the
        # listener subscribes it again when it reconnects.
        self._listened.add(job_id)
        channel = self.keys.channel(job_id)
        try:
            await asyncio.wait_for(self._subscribe(channel), self.subscribe_timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._listened.discard(job_id)
            raise EngineUnavailable(
                f"cannot watch job {job_id!r}: the subscription to Redis at "
                f"{self._redacted_url()} was not confirmed ({str(exc) or 'timed out'}); try again"
            ) from exc

    async def _subscribe(self, channel: str) -> None:
        """Subscribe on the live pub/sub connection (waiting for it while it reconnects) and
        return once Redis has confirmed the subscription."""
        while True:
            await self._connected.wait()
            pubsub = self._pubsub
            if pubsub is None:
                await asyncio.sleep(0)  # the flag is being cleared by a failing listener
                continue
            confirmed = asyncio.get_running_loop().create_future()
            self._confirmations[channel] = confirmed
            try:
                await pubsub.subscribe(channel)
                await confirmed
                return
            except (RedisError, OSError) as exc:
                # The link dropped under us; the listener reconnects, and we try again on
                # the new connection (the caller bounds the whole wait).
                log.info("subscribe to %s interrupted (%s); retrying after reconnect", channel, exc)
                await asyncio.sleep(0)
            finally:
                if self._confirmations.get(channel) is confirmed:
                    del self._confirmations[channel]

    async def unlisten(self, job_id: str) -> None:
        if job_id not in self._listened:
            return
        self._listened.discard(job_id)
        if self._pubsub is not None and self._connected.is_set():
            try:
                await self._pubsub.unsubscribe(self.keys.channel(job_id))
            except (RedisError, OSError) as exc:
                log.warning("unsubscribe from %s failed: %s", job_id, exc)

    async def _listen_forever(self) -> None:
        failures = 0
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=False)
            try:
                # A placeholder channel makes the connection a subscriber right away, so
                # get_message has something to wait on even before any job is watched.
                await pubsub.subscribe(self.keys.channel("*idle*"))
                listened = list(self._listened)
                if listened:
                    await pubsub.subscribe(*(self.keys.channel(j) for j in listened))
                self._pubsub = pubsub
                self._connected.set()
                if failures:
                    log.info("pub/sub reconnected after %d failures; resyncing %d jobs",
                             failures, len(listened))
                    await self._resync(listened)
                failures = 0
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind == "message":
                        self._emit(Change.decode(message["data"]))
                    elif kind == "subscribe":
                        future = self._confirmations.get(message["channel"])
                        if future is not None and not future.done():
                            future.set_result(None)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._connected.clear()
                self._pubsub = None
                for pending in list(self._confirmations.values()):
                    if not pending.done():
                        pending.set_exception(ConnectionError(f"pub/sub connection lost: {exc}"))
                failures += 1
                delay = backoff_delay(failures, base=RECONNECT_BASE_SECONDS, cap=RECONNECT_CAP_SECONDS)
                log.warning("pub/sub connection lost (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _resync(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            if job_id not in self._listened:
                continue
            try:
                state = await self.load(job_id)
            except EngineUnavailable:
                return  # the link dropped again; the next reconnect resyncs
            if state is not None:
                self._emit(Change.of(state))
