"""Embedded engine: one SQLite file in WAL mode, one server process, in-process fan-out.

All access goes through one writer thread that owns the connection. Requests queued while
a transaction commits are run together in the next one (group commit), so the fsync that
makes each write durable is shared by everything that arrived meanwhile, and the event loop
is woken once per transaction to publish its changes and answer its requests.

Reports and endings (``apply``, ``end``) are decided in the writer thread with the Python
rules, against the decoded states the thread keeps of the jobs it wrote last; their rows are
written together just before the commit. A report the rules refuse has written nothing, so
these need no savepoint. Every other operation runs inside a savepoint of its own, so one
that fails leaves the others intact. A failing SQLite statement fails the whole transaction:
nothing of it is stored and every request in it is answered ``EngineUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from json import loads
from json.encoder import encode_basestring, encode_basestring_ascii
from math import isfinite
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
)
from phasecast.errors import (
    ConfigurationError,
    EngineUnavailable,
    JobExists,
    JobNotFound,
    JobTerminal,
    PhasecastError,
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
log = logging.getLogger("phasecast.engines.sqlite")

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

# A transaction takes requests until it holds this many (a batch of reports counting each
# report), so what it keeps in memory and how long it holds the file stay bounded.
_BATCH_LIMIT = 1024
# Decoded states kept by the writer thread, so a report skips reading and parsing its row.
# The stored JSON stays the authority: a commit by any other connection to the file empties
# this (``PRAGMA data_version``), and each row is written only over the seq it was decided
# from.
_STATE_CACHE = 4096
_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA"}

_UPDATE_STATE = (
    "UPDATE jobs SET phase = ?, terminal = ?, seq = ?, updated_at = ?, state = ? "
    "WHERE job_id = ? AND seq = ?"
)
_INSERT_EVENT = "INSERT OR REPLACE INTO job_events VALUES (?, ?, ?)"
_TRIM_EVENTS = "DELETE FROM job_events WHERE job_id = ? AND seq <= ?"

Operation = Callable[[sqlite3.Connection], tuple[Any, Change | None]]
Rule = Callable[[JobState], Outcome]
Step = tuple[str, RuleInputs, Rule]  # a report or an ending of one job, to be decided
StepResult = Decided | OtherJob | Exception


Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


class _Steps:
    """Reports to decide, in order, in the writer thread; answered with the list of their
    results (``many``, an error in place of each one raised) or with the single result
    (raised if it is an error)."""

    __slots__ = ("many", "steps")

    def __init__(self, steps: list[Step], many: bool) -> None:
        self.steps = steps
        self.many = many

    def answer(self, future: asyncio.Future[Any], results: list[StepResult]) -> Answer:
        if not self.many:
            first = results[0]
            return (future, None, first) if isinstance(first, Exception) else (future, first, None)
        for i, result in enumerate(results):
            if isinstance(result, Exception) and not isinstance(result, PhasecastError):
                # A per-item answer has no other way to say it; the rest of the batch stands.
                job_id = self.steps[i][0]
                log.error("report could not be decided", exc_info=result, extra={"job_id": job_id})
                results[i] = EngineUnavailable(f"job {job_id!r} could not be decided: {result!r}")
        return future, results, None

    def fail(self, future: asyncio.Future[Any], error: PhasecastError) -> Answer:
        return (future, [error] * len(self.steps), None) if self.many else (future, None, error)


Request = tuple[Operation | _Steps, "asyncio.Future[Any]"]


class _Diverged(Exception):
    """A row was not at the seq its report was decided from: the kept state was stale."""


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


def history_json(state: JobState) -> str:
    """``json.dumps(base.history_entry(state))``, written by hand: it is built once per
    report, and the general encoder costs ~5x more (measured: 5.3 against 0.9 µs).
    tests/integration/test_sqlite_engine.py holds the two to the same text."""
    return (
        f'{{"seq":{int(state.seq)},"at":{encode_basestring_ascii(state.updated_at)},'
        f'"phase":{encode_basestring_ascii(state.phase.value)},'
        f'"phase_progress":{float(state.phase_progress)!r},"progress":{float(state.progress)!r},'
        f'"message":{encode_basestring_ascii(state.message)}}}'
    )


def _number(value: object) -> str | None:
    """What ``json.dumps`` writes for a finite number (None for anything else)."""
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and isfinite(value):
        return float.__repr__(value)
    return None


def respell(old: JobState, old_json: str, new: JobState) -> str | None:
    """``new.to_json()`` for a report that changed only the scalar fields between
    ``phase_progress`` and ``updated_at`` (the common report: progress, message, ETA), made
    from ``old_json`` (which must be ``old.to_json()``) by re-encoding that run of fields
    only. None when anything else changed. Measured: ~5x cheaper than ``to_json``, which is
    the largest cost of a report in the writer thread after the rules; a check at import
    and tests/integration/test_sqlite_engine.py hold it to ``to_json``'s bytes."""
    if (
        new.phase is not old.phase
        or new.error is not None
        or old.error is not None
        or new.metadata is not old.metadata
        or new.steps_total != old.steps_total
        or new.steps != old.steps
        or new.phases != old.phases
    ):
        return None
    phase_progress, progress = _number(new.phase_progress), _number(new.progress)
    eta = "null" if new.eta_seconds is None else _number(new.eta_seconds)
    if phase_progress is None or progress is None or eta is None or type(new.seq) is not int:
        return None
    # ``,"`` never occurs inside an encoded string (its quotes are escaped), and no key
    # before these two has a value that is an object: the first of each is the key.
    start = old_json.find(',"phase_progress":')
    end = old_json.find(',"phases":', start)
    if start < 0 or end < 0:
        return None
    return (
        f'{old_json[:start]},"phase_progress":{phase_progress},"progress":{progress},'
        f'"message":{encode_basestring(new.message)},"eta_seconds":{eta},"seq":{int.__repr__(new.seq)},'
        f'"epoch":{encode_basestring(new.epoch)},"created_at":{encode_basestring(new.created_at)},'
        f'"updated_at":{encode_basestring(new.updated_at)}{old_json[end:]}'
    )


def _respells_exactly() -> bool:
    """Whether ``respell`` writes what ``to_json`` writes today (a field added to the state
    between those it re-encodes would make it wrong: then it is not used)."""
    sample = JobState(
        job_id="j", owner="o \"é\"", kind="k", phase=Phase.GENERATING, phase_progress=1.5,
        progress=12.25, message="a", eta_seconds=None, seq=7, epoch="e", created_at="c",
        updated_at="u", phases={"GENERATING": {"started_at": "s", "finished_at": None}},
        steps={"p": {"progress": 5.0, "status": "running"}}, steps_total=3, metadata={"m": [1]},
    )
    changed = sample.copy()
    changed.phase_progress, changed.progress, changed.message = 2.0, 13.0, "b\n✏️"
    changed.eta_seconds, changed.seq, changed.updated_at = 4.5, 8, "v"
    return respell(sample, sample.to_json(), changed) == changed.to_json()


_RESPELL = _respells_exactly()


class _Writes:
    """The rows of the reports decided in this transaction: one state row per job (its
    newest), every history entry. Written together (``executemany``) before anything else
    reads the tables and before the commit."""

    __slots__ = ("events", "limit", "rows")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # job id -> (phase, terminal, seq, updated_at, state, job id, stored seq)
        self.rows: dict[str, tuple[str, int, int, str, str, str, int]] = {}
        self.events: list[tuple[str, int, str]] = []

    def add(self, base_seq: int, new: JobState, new_json: str, entry: str) -> None:
        earlier = self.rows.get(new.job_id)
        stored_seq = base_seq if earlier is None else earlier[6]
        self.rows[new.job_id] = (
            new.phase.value, int(new.terminal), new.seq, new.updated_at, new_json, new.job_id,
            stored_seq,
        )
        self.events.append((new.job_id, new.seq, entry))

    def flush(self, conn: sqlite3.Connection) -> None:
        if not self.rows:
            return
        rows = list(self.rows.values())
        updated = conn.executemany(_UPDATE_STATE, rows).rowcount
        if updated != len(rows):
            raise _Diverged(f"{len(rows) - updated} of {len(rows)} job rows were not at the seq "
                            "their reports were decided from")
        conn.executemany(_INSERT_EVENT, self.events)
        trims = [(row[5], row[2] - self.limit) for row in rows if row[2] > self.limit]
        if trims:
            conn.executemany(_TRIM_EVENTS, trims)
        self.rows.clear()
        self.events.clear()


class SQLiteEngine(Engine):
    def __init__(self, url: str, *, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        super().__init__(url)
        self.path, self._synchronous = path_from_url(url)
        self.history_limit = history_limit
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Writer thread only: job id -> (state, its JSON, whether that JSON is the state's
        # ``to_json()``: only then can the next one be respelled from it), newest at the end.
        self._states: OrderedDict[str, tuple[JobState, str, bool]] = OrderedDict()
        self._data_version = 0  # writer thread only

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
        # Requests queued behind the stop (while the thread finished): none is left waiting.
        stopped = EngineUnavailable("the SQLite engine stopped")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                work, future = item
                _settle(*(work.fail(future, stopped) if type(work) is _Steps else (future, None, stopped)))

    # --- the writer thread ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        # A new connection counts versions afresh: nothing kept from before it is trusted.
        self._states.clear()
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
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
            size = _size(first)
            while size < _BATCH_LIMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                size += _size(item)
            changes, answers = self._run_batch(conn, batch)
            # One wake-up of the event loop for the whole transaction.
            loop.call_soon_threadsafe(self._finish, changes, answers)
        conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[Request]
    ) -> tuple[list[Change], list[Answer]]:
        changes: list[Change] = []
        answers: list[Answer] = []
        writes = _Writes(self.history_limit)
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                # Another connection committed to the file since our last transaction.
                self._states.clear()
                self._data_version = version
            for work, future in batch:
                if type(work) is _Steps:
                    results = [self._decide(conn, step, writes, changes) for step in work.steps]
                    answers.append(work.answer(future, results))
                    continue
                assert not isinstance(work, _Steps)
                writes.flush(conn)  # what the operation reads includes every report before it
                conn.execute("SAVEPOINT op")
                try:
                    value, change = work(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    answers.append((future, None, exc))
                else:
                    conn.execute("RELEASE op")
                    answers.append((future, value, None))
                    if change is not None:
                        changes.append(change)
            writes.flush(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            if not isinstance(exc, sqlite3.Error | _Diverged):
                log.exception("SQLite transaction failed")
            # Whatever happens, the thread goes on and every request is answered.
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            self._states.clear()  # it holds states that were never committed
            failure = EngineUnavailable(f"SQLite transaction failed: {exc}")
            return [], [
                work.fail(future, failure) if type(work) is _Steps else (future, None, failure)
                for work, future in batch
            ]
        while len(self._states) > _STATE_CACHE:
            self._states.popitem(last=False)
        return changes, answers

    def _decide(
        self, conn: sqlite3.Connection, step: Step, writes: _Writes, changes: list[Change]
    ) -> StepResult:
        """One report or ending, decided against the job's newest state in this transaction
        (kept, or read). Its rows go to ``writes``; a SQLite error fails the transaction."""
        job_id, inputs, rule = step
        try:
            known = self._states.get(job_id)
            if known is None:
                row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    return JobNotFound(job_id)
                known = (JobState.from_json(row[0]), row[0], False)  # as stored, by anyone
                self._states[job_id] = known
            state, state_json, exact = known
            if state.kind != inputs.kind or state.owner != inputs.owner:
                return OtherJob(state.kind, state.owner)
            outcome = rule(state)
            if not outcome.applied:
                return Decided(False, state_json, state.seq, state.phase.value, state.progress)
            new = outcome.state
            new_json = (exact and _RESPELL and respell(state, state_json, new)) or new.to_json()
            change = Change.of(new, new_json)
            entry = history_json(new)
        except sqlite3.Error:
            raise
        except Exception as exc:
            return exc
        writes.add(state.seq, new, new_json, entry)
        # Kept until the transaction ends even past the cache's size: a later report of
        # this job in the same transaction must be decided from it, not from the old row.
        self._states[job_id] = (new, new_json, True)
        self._states.move_to_end(job_id)
        changes.append(change)
        return Decided(True, new_json, new.seq, new.phase.value, new.progress)

    def _finish(self, changes: list[Change], answers: list[Answer]) -> None:
        # Publish before answering, so a caller that awaits the write sees its change
        # delivered no later than its own reply.
        for change in changes:
            try:
                self._emit(change)
            except Exception:
                log.exception("change handler failed", extra={"job_id": change.job_id})
        for future, value, error in answers:
            _settle(future, value, error)

    async def _submit(self, work: Operation | _Steps) -> Any:
        if self._thread is None or self._loop is None:
            raise EngineUnavailable("the SQLite engine is not started")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((work, future))
        return await future

    async def execute(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the engine's connection, in the writer thread, inside a transaction
        of its own (a savepoint): for plugins that keep tables in this file. It must not
        write the engine's own tables (jobs, job_events, phase_stats)."""
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
            # The caller keeps ``state`` and may change it: the next report reads the row.
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
        result: Decided | OtherJob = await self._submit(
            _Steps([(job_id, inputs, _progress_rule(update, now, inputs))], many=False)
        )
        return result

    async def apply_many(
        self, items: Sequence[tuple[str, ProgressUpdate, RuleInputs]], now: datetime
    ) -> list[Decided | OtherJob | PhasecastError]:
        """Every report decided in order in one request to the writer thread, stored in one
        transaction (with whatever else it commits), published and answered with one wake-up
        of the event loop."""
        if not items:
            return []
        steps = [(job_id, inputs, _progress_rule(update, now, inputs)) for job_id, update, inputs in items]
        try:
            results: list[Decided | OtherJob | PhasecastError] = await self._submit(_Steps(steps, many=True))
        except EngineUnavailable as exc:  # not started
            return [exc] * len(items)
        return results

    async def end(
        self, job_id: str, ending: Ending, now: datetime, inputs: RuleInputs
    ) -> Decided | OtherJob:
        result: Decided | OtherJob = await self._submit(
            _Steps([(job_id, inputs, _ending_rule(ending, now))], many=False)
        )
        return result

    def _append_history(self, conn: sqlite3.Connection, state: JobState) -> None:
        conn.execute(_INSERT_EVENT, (state.job_id, state.seq, history_json(state)))
        if state.seq > self.history_limit:
            conn.execute(_TRIM_EVENTS, (state.job_id, state.seq - self.history_limit))

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
            return [loads(r[0]) for r in reversed(rows)], None

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


def _size(request: Request) -> int:
    work = request[0]
    return len(work.steps) if type(work) is _Steps else 1


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _progress_rule(update: ProgressUpdate, now: datetime, inputs: RuleInputs) -> Rule:
    def rule(state: JobState) -> Outcome:
        # The rules themselves (model.py), run in the writer thread inside the transaction:
        # nothing can come between the read and the write.
        outcome = apply_progress(state, update, now, inputs.weights)
        if outcome.applied:
            outcome.state.eta_seconds = estimate_eta(outcome.state, now, inputs.stats, inputs.weights)
        return outcome

    return rule


def _ending_rule(ending: Ending, now: datetime) -> Rule:
    def rule(state: JobState) -> Outcome:
        return apply_terminal(state, ending.phase, now, message=ending.message, error=ending.error)

    return rule
