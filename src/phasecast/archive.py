"""Durable job records in PostgreSQL: the ``jobs`` table (latest state of every job) and the
``job_events`` table (a row for every phase change and every ending: the timeline).

``record`` never waits for PostgreSQL: it files the state in memory and returns, and one
writer task moves what is filed into the **outbox**, a durable store on the engine
(``Engine.archive_outbox()``: a table in the SQLite file, hashes in Redis), then from the
outbox into PostgreSQL in batches, and removes from the outbox exactly what was written. If
PostgreSQL is down, records wait in the outbox, where a crash of the server does not lose
them; the writer retries with capped backoff, and replays the outbox when a server starts.
Per job only the newest state is kept for ``jobs`` (older ones would be overwritten anyway);
one event per phase entered. So the outbox grows with the number of jobs and phase changes
during an outage, not with the number of progress updates.

``job_events`` has exactly one row per (job, epoch, phase): the row of the change that entered
the phase, whichever instance writes it and however often (the earliest seq wins).

The schema is created and upgraded by numbered migrations, applied under an advisory lock so
that several server instances starting at once do not race.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from phasecast.backoff import backoff_delay
from phasecast.engines.extensions import ArchiveOutbox
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
    # One row per (job, epoch, phase): duplicates written by alternating instances go, the
    # earliest row of each phase (the change that entered it) stays.
    (2, """
DELETE FROM job_events AS later USING job_events AS earlier
WHERE later.job_id = earlier.job_id AND later.epoch = earlier.epoch
  AND later.phase = earlier.phase AND later.seq > earlier.seq;
ALTER TABLE job_events DROP CONSTRAINT job_events_pkey;
ALTER TABLE job_events ADD PRIMARY KEY (job_id, epoch, phase);
CREATE INDEX job_events_by_seq ON job_events (job_id, epoch, seq);
"""),
)
MIGRATION_LOCK = 0x70686173  # "phas": advisory lock id for migrations

RETRY_BASE_SECONDS = 0.1
RETRY_CAP_SECONDS = 2.0
BATCH_LIMIT = 500
CONNECT_TIMEOUT_SECONDS = 3.0
STOP_FLUSH_SECONDS = 5.0

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
ON CONFLICT (job_id, epoch, phase) DO UPDATE SET
    seq = EXCLUDED.seq, at = EXCLUDED.at, phase_progress = EXCLUDED.phase_progress,
    progress = EXCLUDED.progress, message = EXCLUDED.message, error = EXCLUDED.error
WHERE job_events.seq > EXCLUDED.seq
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

    @property
    def key(self) -> str:
        """One event per job, epoch and phase (ids never contain the separator)."""
        return f"{self.job_id}\x1f{self.epoch}\x1f{self.phase}"

    def to_json(self) -> str:
        return json.dumps([self.job_id, self.epoch, self.seq, self.at, self.phase, self.phase_progress,
                           self.progress, self.message, self.error], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Event:
        return cls(*json.loads(text))


def is_milestone(state: JobState) -> bool:
    """Creation, entering a phase, or ending: what the timeline keeps. The state itself tells,
    whichever instance stored it: its phase started with this very change."""
    if state.seq == 1 or state.terminal:
        return True
    span = state.phases.get(state.phase.value) or {}
    return span.get("started_at") == state.updated_at


class MemoryOutbox:
    """The outbox of an archive used without an engine's (an in-process tracker built by
    hand): the same behaviour, but lost with the process."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[int, str]] = {}
        self._events: dict[str, str] = {}

    async def start(self) -> None:
        return None

    async def put(self, states: list[tuple[str, int, str]], events: list[tuple[str, str]]) -> None:
        for job_id, seq, state_json in states:
            filed = self._states.get(job_id)
            if filed is None or filed[0] < seq:
                self._states[job_id] = (seq, state_json)
        for key, event_json in events:
            self._events.setdefault(key, event_json)

    async def states(self, limit: int) -> list[tuple[str, int, str]]:
        return [(job_id, seq, text) for job_id, (seq, text) in list(self._states.items())[:limit]]

    async def events(self, limit: int) -> list[tuple[str, str]]:
        return list(self._events.items())[:limit]

    async def state(self, job_id: str) -> str | None:
        filed = self._states.get(job_id)
        return None if filed is None else filed[1]

    async def ack(self, states: list[tuple[str, int]], events: list[str]) -> None:
        for job_id, seq in states:
            if self._states.get(job_id, (None,))[0] == seq:
                del self._states[job_id]
        for key in events:
            self._events.pop(key, None)

    async def size(self) -> int:
        return len(self._states) + len(self._events)


class PostgresArchive:
    """Implements ``phasecast.tracker.Archive``."""

    def __init__(
        self, url: str, *, outbox: ArchiveOutbox | None = None, retry_cap: float = RETRY_CAP_SECONDS
    ) -> None:
        self.url = url
        self.retry_cap = retry_cap
        self.outbox: ArchiveOutbox = outbox if outbox is not None else MemoryOutbox()
        self.durable = outbox is not None
        self._pool: Any = None
        self._filed: list[tuple[JobState, Event | None]] = []  # not yet in the outbox
        self._backlog = 0  # outbox entries last seen waiting for PostgreSQL
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self.written = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        """Records filed but not yet in PostgreSQL (as of the writer's last look)."""
        return len(self._filed) + self._backlog

    def redacted_url(self) -> str:
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.outbox.start()
        self._backlog = await self.outbox.size()  # left by a server that stopped or crashed
        if self._backlog:
            log.info("archive outbox holds %d records from before; replaying", self._backlog)
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
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            self._writer = None
        if self._filed:
            log.error("archive stopped with %d records in neither PostgreSQL nor the outbox",
                      len(self._filed))
        elif self._backlog:
            where = "the engine's outbox" if self.durable else "memory (lost now: no engine outbox)"
            log.warning("archive stopped with %d records waiting in %s for PostgreSQL",
                        self._backlog, where)
        await self._close_pool()

    # --- the Archive protocol ------------------------------------------------------------

    def record(self, state: JobState) -> None:
        self._filed.append((state, Event.of(state) if is_milestone(state) else None))
        self._wake.set()

    async def load(self, job_id: str) -> JobState | None:
        for state, _ in reversed(self._filed):
            if state.job_id == job_id:
                return state.copy()  # newer than what PostgreSQL has
        waiting = await self.outbox.state(job_id)
        if waiting is not None:
            return JobState.from_json(waiting)
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
            if not self._filed and not self._backlog:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._to_outbox()
                if self._stopping and failures >= 2:
                    return  # what is filed is durable; PostgreSQL gets it after the next start
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
                if failures == 1 or failures % 20 == 0:
                    log.warning("archive cannot write to PostgreSQL (%s); %d records wait, retrying",
                                exc, self.pending)
                if self._stopping and (failures >= 3 or not self._filed):
                    return
                await asyncio.sleep(backoff_delay(failures, base=RETRY_BASE_SECONDS, cap=self.retry_cap))

    async def _to_outbox(self) -> None:
        """Move what ``record`` filed into the durable outbox (one write for the lot)."""
        if not self._filed:
            return
        count = len(self._filed)
        filed = self._filed[:count]
        states: dict[str, JobState] = {}
        events: list[tuple[str, str]] = []
        for state, event in filed:
            if state.job_id not in states or states[state.job_id].seq < state.seq:
                states[state.job_id] = state
            if event is not None:
                events.append((event.key, event.to_json()))
        await self.outbox.put([(s.job_id, s.seq, s.to_json()) for s in states.values()], events)
        del self._filed[:count]  # records filed during the write stay filed
        self._backlog += len(states) + len(events)

    async def _write_batch(self) -> None:
        waiting = await self.outbox.states(BATCH_LIMIT)
        events = [(key, Event.from_json(text)) for key, text in await self.outbox.events(BATCH_LIMIT)]
        if not waiting and not events:
            self._backlog = 0
            return
        jobs = {job_id: (seq, JobState.from_json(text)) for job_id, seq, text in waiting}
        # Events name their job (foreign key): write each event's job row in this batch too,
        # if it still waits; otherwise it was written before.
        for _, event in events:
            if event.job_id not in jobs:
                text = await self.outbox.state(event.job_id)
                if text is not None:
                    state = JobState.from_json(text)
                    jobs[event.job_id] = (state.seq, state)
        pool = await self._connect()
        async with pool.acquire() as connection, connection.transaction():
            if jobs:
                await connection.executemany(_UPSERT_JOB, [_job_row(s) for _, s in jobs.values()])
            if events:
                await connection.executemany(_INSERT_EVENT, [_event_row(e) for _, e in events])
        # Only now, and only what was written: records filed meanwhile stay in the outbox.
        written = [(job_id, seq) for job_id, (seq, _) in jobs.items()]
        await self.outbox.ack(written, [key for key, _ in events])
        self.written += len(jobs) + len(events)
        self._backlog = await self.outbox.size()


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
    return (state.job_id, _pg(state.owner), state.kind, state.phase.value, state.terminal,
            state.progress, state.seq, state.epoch, parse_time(state.created_at),
            parse_time(state.updated_at), None if state.error is None else _pg(state.error.code),
            None if state.error is None else _pg(state.error.message), _pg_json(state.to_json()))


def _event_row(event: Event) -> tuple[Any, ...]:
    return (event.job_id, event.epoch, event.seq, parse_time(event.at), event.phase,
            event.phase_progress, event.progress, _pg(event.message),
            None if event.error is None else _pg_json(event.error))


# PostgreSQL keeps no NUL in text or jsonb. Job text is refused with a NUL since it would
# stall the archive (model.validate_text), but a state stored before that rule may hold one:
# the archive keeps it with U+FFFD in its place rather than retrying it forever and holding
# every later record back.
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _pg(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _pg_json(text: str) -> str:
    """JSON text without the ``\\u0000`` escape (an escaped backslash before ``u0000`` is kept)."""
    return _NUL_ESCAPE.sub(r"\1\\ufffd", text) if "\\u0000" in text else text


def open_archive(url: str, outbox: ArchiveOutbox | None = None) -> PostgresArchive:
    """The archive at ``url``; ``outbox`` (``engine.archive_outbox()``) makes the records
    waiting for PostgreSQL survive a crash of the server."""
    scheme = urlsplit(url).scheme
    if scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"archive URL {url!r} is not PostgreSQL; use postgresql://user@host:5432/database"
        )
    return PostgresArchive(url, outbox=outbox)
