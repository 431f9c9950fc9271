"""Embedded engine: one SQLite file in WAL mode, one server process, in-process fan-out.

All access goes through one writer thread that owns the connection. Operations queued while
a transaction commits are run together in the next one (group commit), so the cost of the
fsync that makes each write durable is shared by everything that arrived meanwhile. Each
operation runs inside its own savepoint: one that fails leaves the others intact.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

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
from phasecast.errors import (
    ConfigurationError,
    EngineUnavailable,
    JobExists,
    JobNotFound,
    JobTerminal,
)
from phasecast.model import (
    JobState,
    Outcome,
    Phase,
    ProgressUpdate,
    apply_progress,
    apply_terminal,
)
from phasecast.progress import PhaseStat, PhaseStats, estimate_eta, learn

if TYPE_CHECKING:
    from phasecast.engines.sqlite_outbox import SQLiteArchiveOutbox
    from phasecast.engines.sqlite_panels import SQLitePanelRecords

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,
    terminal INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS phase_stats (
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,
    mean_seconds REAL NOT NULL,
    samples INTEGER NOT NULL,
    PRIMARY KEY (kind, phase)
) WITHOUT ROWID;
"""

_BATCH_LIMIT = 256
# Parsed states kept by the writer thread, so a report skips reading and parsing its row.
# This process is the only writer of the file, so what it wrote last is what is stored.
_STATE_CACHE = 4096
_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA"}

Operation = Callable[[sqlite3.Connection], tuple[Any, Change | None]]


def path_from_url(url: str) -> tuple[Path, str]:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``; ``?synchronous=normal`` trades
    durability on power loss for speed (a crashed process still loses nothing)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a SQLite URL: {url!r}")
    raw = parts.netloc + parts.path
    if raw.startswith("/"):
        raw = raw[1:]
    if not raw:
        raise ConfigurationError(
            f"SQLite URL {url!r} names no file; use sqlite:///phasecast.db or sqlite:////abs/path.db"
        )
    sync = parse_qs(parts.query).get("synchronous", ["full"])[0].lower()
    if sync not in _SYNC_MODES:
        raise ConfigurationError(f"synchronous must be one of {', '.join(_SYNC_MODES)}, got {sync!r}")
    return Path(raw), _SYNC_MODES[sync]


class SQLiteEngine(Engine):
    def __init__(self, url: str, *, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        super().__init__(url)
        self.path, self._synchronous = path_from_url(url)
        self.history_limit = history_limit
        self._queue: queue.SimpleQueue[tuple[Operation, asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._states: OrderedDict[str, tuple[JobState, str]] = OrderedDict()  # writer thread only

    async def start(self, on_change: ChangeHandler | None = None) -> None:
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="phasecast-sqlite", daemon=True
        )
        self._thread.start()
        await ready

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # --- the writer thread ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            error = EngineUnavailable(f"cannot open SQLite database {self.path}: {exc}")
            loop.call_soon_threadsafe(_settle, ready, None, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < _BATCH_LIMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[Operation, asyncio.Future[Any]]]
    ) -> None:
        assert self._loop is not None
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None, Change | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value, change = operation(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((future, None, exc, None))
                else:
                    conn.execute("RELEASE op")
                    results.append((future, value, None, change))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._states.clear()  # it may hold states that were never committed
            failure = EngineUnavailable(f"SQLite transaction failed: {exc}")
            results = [(future, None, failure, None) for _, future in batch]
        for future, value, error, change in results:
            self._loop.call_soon_threadsafe(self._finish, future, value, error, change)

    def _finish(
        self,
        future: asyncio.Future[Any],
        value: Any,
        error: BaseException | None,
        change: Change | None,
    ) -> None:
        # Publish before resolving, so a caller that awaits the write sees its change delivered
        # no later than its own reply.
        if change is not None:
            self._emit(change)
        _settle(future, value, error)

    async def _submit(self, operation: Operation) -> Any:
        if self._thread is None or self._loop is None:
            raise EngineUnavailable("the SQLite engine is not started")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((operation, future))
        return await future

    async def execute(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the engine's connection, in the writer thread, inside a transaction
        of its own (a savepoint): for plugins that keep tables in this file."""
        result: T = await self._submit(lambda conn: (work(conn), None))
        return result

    def panel_records(self) -> SQLitePanelRecords:
        from phasecast.engines.sqlite_panels import SQLitePanelRecords

        return SQLitePanelRecords(self)

    def archive_outbox(self) -> SQLiteArchiveOutbox:
        from phasecast.engines.sqlite_outbox import SQLiteArchiveOutbox

        return SQLiteArchiveOutbox(self)

    # --- operations ----------------------------------------------------------------------

    async def listen(self, job_id: str) -> None:
        # Every change of this process passes through ``_finish``; there is nothing to
        # subscribe to, only a started engine to be sure of.
        if self._thread is None or self._on_change is None:
            raise EngineUnavailable(
                "the SQLite engine is not started with a change handler; its changes cannot be watched"
            )

    async def ping(self) -> None:
        await self._submit(lambda conn: (conn.execute("SELECT 1").fetchone(), None))

    async def insert(self, state: JobState) -> None:
        state_json = state.to_json()

        def op(conn: sqlite3.Connection) -> tuple[None, Change]:
            try:
                conn.execute(
                    "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        state.job_id,
                        state.owner,
                        state.kind,
                        state.phase.value,
                        int(state.terminal),
                        state.seq,
                        state.created_at,
                        state.updated_at,
                        state_json,
                    ),
                )
            except sqlite3.IntegrityError:
                raise JobExists(state.job_id) from None
            self._append_history(conn, state)
            return None, Change.of(state, state_json)

        await self._submit(op)

    async def load(self, job_id: str) -> JobState | None:
        def op(conn: sqlite3.Connection) -> tuple[JobState | None, None]:
            row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return (None if row is None else JobState.from_json(row[0])), None

        result: JobState | None = await self._submit(op)
        return result

    async def replace(self, state: JobState, expected_seq: int) -> bool:
        check_successor(state, expected_seq)
        state_json = state.to_json()

        def op(conn: sqlite3.Connection) -> tuple[bool, Change | None]:
            cursor = conn.execute(
                "UPDATE jobs SET phase = ?, terminal = ?, seq = ?, updated_at = ?, state = ? "
                "WHERE job_id = ? AND seq = ? AND terminal = 0",
                (
                    state.phase.value,
                    int(state.terminal),
                    state.seq,
                    state.updated_at,
                    state_json,
                    state.job_id,
                    expected_seq,
                ),
            )
            self._states.pop(state.job_id, None)
            if cursor.rowcount != 1:
                row = conn.execute(
                    "SELECT seq, terminal, phase FROM jobs WHERE job_id = ?", (state.job_id,)
                ).fetchone()
                if row is not None and row[0] == expected_seq and row[1]:
                    raise JobTerminal(state.job_id, Phase(row[2]))
                return False, None  # gone, or another write came first
            self._append_history(conn, state)
            return True, Change.of(state, state_json)

        applied: bool = await self._submit(op)
        return applied

    async def apply(
        self, job_id: str, update: ProgressUpdate, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        def rule(state: JobState) -> Outcome:
            # The rules themselves (model.py), run on the writer thread inside this
            # transaction: nothing can come between the read and the write.
            outcome = apply_progress(state, update, now, inputs.weights)
            if outcome.applied:
                outcome.state.eta_seconds = estimate_eta(
                    outcome.state, now, inputs.stats, inputs.weights
                )
            return outcome

        return await self._step(job_id, inputs, rule)

    async def end(
        self, job_id: str, ending: Ending, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        return await self._step(
            job_id,
            inputs,
            lambda state: apply_terminal(
                state, ending.phase, now, message=ending.message, error=ending.error
            ),
        )

    async def _step(
        self, job_id: str, inputs: RuleInputs, rule: Callable[[JobState], Outcome]
    ) -> Decided | OtherJob:
        def op(conn: sqlite3.Connection) -> tuple[Decided | OtherJob, Change | None]:
            known = self._states.pop(job_id, None)
            if known is None:
                row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    raise JobNotFound(job_id)
                known = (JobState.from_json(row[0]), row[0])
            state, state_json = known
            if state.kind != inputs.kind or state.owner != inputs.owner:
                self._keep(state, state_json)
                return OtherJob(state.kind, state.owner), None
            outcome = rule(state)
            if not outcome.applied:
                self._keep(state, state_json)
                return Decided(False, state_json), None
            new = outcome.state
            new_json = new.to_json()
            conn.execute(
                "UPDATE jobs SET phase = ?, terminal = ?, seq = ?, updated_at = ?, state = ? "
                "WHERE job_id = ?",
                (new.phase.value, int(new.terminal), new.seq, new.updated_at, new_json, job_id),
            )
            self._append_history(conn, new)
            self._keep(new, new_json)
            return Decided(True, new_json), Change.of(new, new_json)

        result: Decided | OtherJob = await self._submit(op)
        return result

    def _keep(self, state: JobState, state_json: str) -> None:
        self._states[state.job_id] = (state, state_json)
        if len(self._states) > _STATE_CACHE:
            self._states.popitem(last=False)

    def _append_history(self, conn: sqlite3.Connection, state: JobState) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO job_events VALUES (?, ?, ?)",
            (state.job_id, state.seq, json.dumps(history_entry(state), separators=(",", ":"))),
        )
        if state.seq > self.history_limit:
            conn.execute(
                "DELETE FROM job_events WHERE job_id = ? AND seq <= ?",
                (state.job_id, state.seq - self.history_limit),
            )

    async def list_jobs(
        self, owner: str | None, *, active_only: bool, limit: int
    ) -> list[JobState]:
        clauses, params = [], []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if active_only:
            clauses.append("terminal = 0")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT state FROM jobs {where} ORDER BY created_at DESC, job_id LIMIT ?"

        def op(conn: sqlite3.Connection) -> tuple[list[JobState], None]:
            rows = conn.execute(sql, (*params, limit)).fetchall()
            return [JobState.from_json(r[0]) for r in rows], None

        jobs: list[JobState] = await self._submit(op)
        return jobs

    async def history(self, job_id: str, *, limit: int) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], None]:
            rows = conn.execute(
                "SELECT entry FROM job_events WHERE job_id = ? ORDER BY seq DESC LIMIT ?",
                (job_id, limit),
            ).fetchall()
            return [json.loads(r[0]) for r in reversed(rows)], None

        entries: list[dict[str, Any]] = await self._submit(op)
        return entries

    async def load_stats(self, kind: str) -> PhaseStats:
        def op(conn: sqlite3.Connection) -> tuple[PhaseStats, None]:
            rows = conn.execute(
                "SELECT phase, mean_seconds, samples FROM phase_stats WHERE kind = ?", (kind,)
            ).fetchall()
            return {Phase(p): PhaseStat(m, n) for p, m, n in rows}, None

        stats: PhaseStats = await self._submit(op)
        return stats

    async def record_durations(self, kind: str, durations: dict[Phase, float]) -> None:
        def op(conn: sqlite3.Connection) -> tuple[None, None]:
            for phase, seconds in durations.items():
                row = conn.execute(
                    "SELECT mean_seconds, samples FROM phase_stats WHERE kind = ? AND phase = ?",
                    (kind, phase.value),
                ).fetchone()
                stat = learn(None if row is None else PhaseStat(row[0], row[1]), seconds)
                conn.execute(
                    "INSERT OR REPLACE INTO phase_stats VALUES (?, ?, ?, ?)",
                    (kind, phase.value, stat.mean_seconds, stat.samples),
                )
            return None, None

        await self._submit(op)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
