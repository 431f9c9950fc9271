"""Durable job records in PostgreSQL: the ``jobs`` table (latest state of every job) and the
``job_events`` table (a row for every phase change and every ending: the timeline).

``record`` never waits for PostgreSQL: it files the state in memory and returns, and one
writer task moves what is filed into PostgreSQL in batches. If PostgreSQL is down, the writer
keeps what is filed, retries with capped backoff, and catches up when PostgreSQL is back.
Per job only the newest state is kept for ``jobs`` (older ones would be overwritten anyway);
every event is kept. So memory grows with the number of jobs and phase changes during an
outage, not with the number of progress updates.

The schema is created and upgraded by numbered migrations, applied under an advisory lock so
that several server instances starting at once do not race.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from phasecast.errors import ConfigurationError, EngineUnavailable
from phasecast.model import JobState, parse_time

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ConfigurationError(
        "the PostgreSQL archive needs asyncpg: pip install 'phasecast[postgres]'"
    ) from exc

log = logging.getLogger("phasecast.archive")

# (version, SQL). Append new migrations; never edit one that has shipped.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE jobs (
    job_id        text PRIMARY KEY,
    owner         text NOT NULL,
    kind          text NOT NULL,
    phase         text NOT NULL,
    terminal      boolean NOT NULL,
    progress      double precision NOT NULL,
    seq           bigint NOT NULL,
    epoch         text NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    error_code    text,
    error_message text,
    state         jsonb NOT NULL
);
CREATE INDEX jobs_by_owner ON jobs (owner, created_at DESC);
CREATE INDEX jobs_active ON jobs (updated_at) WHERE NOT terminal;
CREATE TABLE job_events (
    job_id         text NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    epoch          text NOT NULL,
    seq            bigint NOT NULL,
    at             timestamptz NOT NULL,
    phase          text NOT NULL,
    phase_progress double precision NOT NULL,
    progress       double precision NOT NULL,
    message        text NOT NULL,
    error          jsonb,
    PRIMARY KEY (job_id, epoch, seq)
);
"""),
)
MIGRATION_LOCK = 0x70686173  # "phas": advisory lock id for migrations

RETRY_BASE_SECONDS = 0.1
RETRY_CAP_SECONDS = 2.0
BATCH_LIMIT = 500
CONNECT_TIMEOUT_SECONDS = 3.0
STOP_FLUSH_SECONDS = 5.0
MAX_TRACKED_PHASES = 100_000

_UPSERT_JOB = """
INSERT INTO jobs (job_id, owner, kind, phase, terminal, progress, seq, epoch, created_at,
                  updated_at, error_code, error_message, state)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb)
ON CONFLICT (job_id) DO UPDATE SET
    owner = EXCLUDED.owner, kind = EXCLUDED.kind, phase = EXCLUDED.phase,
    terminal = EXCLUDED.terminal, progress = EXCLUDED.progress, seq = EXCLUDED.seq,
    epoch = EXCLUDED.epoch, updated_at = EXCLUDED.updated_at, error_code = EXCLUDED.error_code,
    error_message = EXCLUDED.error_message, state = EXCLUDED.state
WHERE jobs.seq < EXCLUDED.seq
"""

_INSERT_EVENT = """
INSERT INTO job_events (job_id, epoch, seq, at, phase, phase_progress, progress, message, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)
ON CONFLICT DO NOTHING
"""


@dataclass(slots=True, frozen=True)
class Event:
    job_id: str
    epoch: str
    seq: int
    at: str
    phase: str
    phase_progress: float
    progress: float
    message: str
    error: str | None

    @classmethod
    def of(cls, state: JobState) -> Event:
        return cls(state.job_id, state.epoch, state.seq, state.updated_at, state.phase.value,
                   state.phase_progress, state.progress, state.message,
                   None if state.error is None else json.dumps(state.error.to_dict()))


def is_milestone(state: JobState, last_phase: str | None) -> bool:
    """Creation, entering a phase, or ending: what the timeline keeps. ``last_phase`` is the
    phase this process last recorded for the job; when it does not know (another instance
    wrote the earlier changes) the state itself tells: its phase started with this change."""
    if state.seq == 1 or state.terminal:
        return True
    if last_phase is not None:
        return last_phase != state.phase.value
    span = state.phases.get(state.phase.value) or {}
    return span.get("started_at") == state.updated_at


class PostgresArchive:
    """Implements ``phasecast.tracker.Archive``."""

    def __init__(self, url: str, *, retry_cap: float = RETRY_CAP_SECONDS) -> None:
        self.url = url
        self.retry_cap = retry_cap
        self._pool: Any = None
        self._latest: dict[str, JobState] = {}
        self._phases: dict[str, str] = {}  # job id → phase last recorded by this process
        self._events: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self.written = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        """Records filed but not yet in PostgreSQL (job rows plus events)."""
        return len(self._latest) + len(self._events)

    def redacted_url(self) -> str:
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        # PostgreSQL being down at start-up does not stop the server: the writer connects
        # (and migrates) as soon as it can, and catches up.
        with contextlib.suppress(EngineUnavailable):
            await self._connect()
        self._writer = asyncio.create_task(self._write_forever(), name="phasecast-archive")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), STOP_FLUSH_SECONDS)
            except TimeoutError:
                log.error("archive stopped with %d records not yet in PostgreSQL", self.pending)
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            self._writer = None
        await self._close_pool()

    # --- the Archive protocol ------------------------------------------------------------

    def record(self, state: JobState) -> None:
        filed = self._latest.get(state.job_id)
        if filed is None or filed.seq < state.seq:
            self._latest[state.job_id] = state
        if is_milestone(state, self._phases.get(state.job_id)):
            self._events.append(Event.of(state))
        if state.terminal:
            self._phases.pop(state.job_id, None)
        else:
            self._phases[state.job_id] = state.phase.value
            if len(self._phases) > MAX_TRACKED_PHASES:  # jobs abandoned without an ending
                del self._phases[next(iter(self._phases))]
        self._wake.set()

    async def load(self, job_id: str) -> JobState | None:
        filed = self._latest.get(job_id)
        if filed is not None:
            return filed.copy()  # newer than what PostgreSQL has
        pool = await self._connect()
        try:
            raw = await pool.fetchval("SELECT state FROM jobs WHERE job_id = $1", job_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise EngineUnavailable(f"the archive at {self.redacted_url()} cannot be read: {exc}") from exc
        return None if raw is None else JobState.from_json(raw)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The archived timeline of a job, oldest first."""
        pool = await self._connect()
        rows = await pool.fetch(
            "SELECT epoch, seq, at, phase, phase_progress, progress, message, error "
            "FROM job_events WHERE job_id = $1 ORDER BY seq, at", job_id)
        return [dict(row) for row in rows]

    # --- writing -------------------------------------------------------------------------

    async def _connect(self) -> Any:
        if self._pool is not None:
            return self._pool
        try:
            pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4,
                                             timeout=CONNECT_TIMEOUT_SECONDS, command_timeout=10)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise EngineUnavailable(f"the archive at {self.redacted_url()} is unreachable: {exc}") from exc
        try:
            await migrate(pool)
        except BaseException:
            await pool.close()
            raise
        if self._pool is None:
            self._pool = pool
        else:  # another caller connected meanwhile
            await pool.close()
        return self._pool

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)

    async def _write_forever(self) -> None:
        failures = 0
        while True:
            if not self._latest and not self._events:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._write_batch()
                if failures:
                    log.info("archive caught up with PostgreSQL after %d failed attempts", failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.failures += 1
                await self._close_pool()
                delay = min(self.retry_cap, RETRY_BASE_SECONDS * 2 ** min(failures, 10))
                if failures == 1 or failures % 20 == 0:
                    log.warning("archive cannot write to PostgreSQL (%s); %d records wait, retrying",
                                exc, self.pending)
                if self._stopping and failures >= 3:
                    log.error("archive stopped with %d records not yet in PostgreSQL", self.pending)
                    return
                await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _write_batch(self) -> None:
        jobs = list(self._latest.values())[:BATCH_LIMIT]
        events = [self._events[i] for i in range(min(BATCH_LIMIT, len(self._events)))]
        # Events name their job (foreign key): write each event's job row in this batch too.
        ids = {state.job_id for state in jobs}
        extra = [self._latest[e.job_id] for e in events if e.job_id not in ids and e.job_id in self._latest]
        for state in extra:
            ids.add(state.job_id)
            jobs.append(state)
        pool = await self._connect()
        async with pool.acquire() as connection, connection.transaction():
            if jobs:
                await connection.executemany(_UPSERT_JOB, [_job_row(s) for s in jobs])
            if events:
                await connection.executemany(_INSERT_EVENT, [_event_row(e) for e in events])
        # Only now, and only what was written: records filed meanwhile stay filed.
        for state in jobs:
            if self._latest.get(state.job_id) is state:
                del self._latest[state.job_id]
        for _ in events:
            self._events.popleft()
        self.written += len(jobs) + len(events)


async def migrate(pool: Any) -> int:
    """Apply the migrations this database lacks; returns the schema version."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS phasecast_schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {r["version"] for r in await connection.fetch(
            "SELECT version FROM phasecast_schema_migrations")}
        for version, sql in MIGRATIONS:
            if version not in applied:
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO phasecast_schema_migrations (version) VALUES ($1)", version)
                log.info("archive schema migrated to version %d", version)
        return max(v for v, _ in MIGRATIONS)


def _job_row(state: JobState) -> tuple[Any, ...]:
    return (state.job_id, state.owner, state.kind, state.phase.value, state.terminal, state.progress,
            state.seq, state.epoch, parse_time(state.created_at), parse_time(state.updated_at),
            None if state.error is None else state.error.code,
            None if state.error is None else state.error.message, state.to_json())


def _event_row(event: Event) -> tuple[Any, ...]:
    return (event.job_id, event.epoch, event.seq, parse_time(event.at), event.phase,
            event.phase_progress, event.progress, event.message, event.error)


def open_archive(url: str) -> PostgresArchive:
    scheme = urlsplit(url).scheme
    if scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"archive URL {url!r} is not PostgreSQL; use postgresql://user@host:5432/database"
        )
    return PostgresArchive(url)
