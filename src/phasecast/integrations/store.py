"""Where the RunPod side of each panel is kept: which RunPod job draws it, how far it got,
when to poll it next, and who is polling it.

The set of in-flight panels is stored, never only held in memory, so a restarted server (or
another instance) picks up polling where the last one stopped. Two implementations:

* ``RedisPanelStore`` for the Redis engine: a hash of panel records per job, one sorted set
  of in-flight panels scored by their next poll time, and a lease key per in-flight RunPod
  job so that exactly one instance polls it; a lease whose holder died expires and another
  instance takes over.
* ``SQLitePanelStore`` for the embedded engine: a table of its own in the engine's SQLite
  file. One process serves an SQLite engine, so its leases live in memory.

Records change by compare-and-set on their serialized form: a webhook and a poll that see
the same RunPod job finish race to record it, and only the winner acts (resubmits, fails the
job), so nothing happens twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from phasecast.engines.base import Engine

PanelStatus = Literal["submitting", "IN_QUEUE", "IN_PROGRESS", "done", "failed", "cancelled"]
ACTIVE_STATUSES: frozenset[str] = frozenset({"submitting", "IN_QUEUE", "IN_PROGRESS"})
RECORD_TTL_SECONDS = 7 * 24 * 3600


@dataclass(slots=True, frozen=True)
class FailurePolicy:
    """What a failed panel does to its job: ``fail`` it, or ``retry`` the panel up to
    ``max_retries`` more times, by ``/retry`` on the same RunPod job or a new ``/run``."""

    on_failure: Literal["fail", "retry"] = "fail"
    max_retries: int = 0
    retry_with: Literal["run", "retry"] = "run"


@dataclass(slots=True, frozen=True)
class Panel:
    job_id: str
    step: str
    input: Any
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    status: PanelStatus = "submitting"
    runpod_id: str | None = None
    attempt: int = 1
    progress: float = 0.0
    output: Any = None
    error: dict[str, str] | None = None
    next_poll: float = 0.0  # Unix time
    updated_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def member(self) -> str:
        # "/" never occurs in job ids or step ids, so this splits back unambiguously.
        return f"{self.job_id}/{self.step}"

    def evolve(self, **changes: Any) -> Panel:
        return replace(self, updated_at=time.time(), **changes)

    def to_json(self) -> str:
        # Sorted keys: the compare-and-set compares serialized records.
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Panel:
        data = json.loads(text)
        data["policy"] = FailurePolicy(**data.get("policy") or {})
        return cls(**data)

    def public(self) -> dict[str, Any]:
        """What the panels endpoint shows (the input can be large and is the caller's own)."""
        return {
            "step": self.step,
            "status": self.status,
            "runpod_id": self.runpod_id,
            "attempt": self.attempt,
            "progress": self.progress,
            "output": self.output,
            "error": self.error,
        }


def split_member(member: str) -> tuple[str, str]:
    job_id, _, step = member.partition("/")
    return job_id, step


class PanelStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, job_id: str, step: str) -> Panel | None: ...

    async def panels(self, job_id: str) -> list[Panel]: ...

    async def swap(self, old: Panel | None, new: Panel) -> bool:
        """Store ``new`` if the stored record is still ``old`` (``None``: none stored)."""
        ...

    async def schedule(self, panel: Panel, at: float) -> None:
        """Poll an in-flight panel next at ``at``; does nothing once it has finished."""
        ...

    async def due(self, now: float, limit: int) -> list[tuple[str, str]]: ...

    async def lease(self, key: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease ``key`` for ``owner``; False if someone else holds it."""
        ...

    async def release(self, key: str, owner: str) -> None: ...


def open_store(engine: Engine) -> PanelStore:
    from phasecast.engines.redis import RedisEngine
    from phasecast.engines.sqlite import SQLiteEngine

    if isinstance(engine, RedisEngine):
        return RedisPanelStore(engine)
    if isinstance(engine, SQLiteEngine):
        return SQLitePanelStore(engine.path)
    raise TypeError(f"the RunPod integration does not support {type(engine).__name__}")


# --- Redis ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RunPodKeys:
    """Every Redis key the RunPod integration uses, under the engine's prefix."""

    prefix: str

    def panels(self, job_id: str) -> str:
        """Hash: step id → panel record (JSON)."""
        return f"{self.prefix}:runpod:panels:{job_id}"

    def inflight(self) -> str:
        """Sorted set of ``job_id/step`` of every in-flight panel, scored by next poll time."""
        return f"{self.prefix}:runpod:inflight"

    def lease(self, key: str) -> str:
        """String: the instance id polling one in-flight RunPod job, with a TTL."""
        return f"{self.prefix}:runpod:lease:{key}"


_SWAP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[7])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
else
  redis.call('ZREM', KEYS[2], ARGV[6])
end
return 1
"""

_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisPanelStore:
    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.keys = RunPodKeys(engine.keys.prefix)

    async def start(self) -> None:
        client = self._engine.client
        self._swap = client.register_script(_SWAP)
        self._lease = client.register_script(_LEASE)
        self._release = client.register_script(_RELEASE)

    async def close(self) -> None:
        return None  # the engine owns the connection

    async def get(self, job_id: str, step: str) -> Panel | None:
        raw = await self._engine.client.hget(self.keys.panels(job_id), step)
        return None if raw is None else Panel.from_json(raw)

    async def panels(self, job_id: str) -> list[Panel]:
        rows = await self._engine.client.hgetall(self.keys.panels(job_id))
        return sorted((Panel.from_json(raw) for raw in rows.values()), key=_panel_order)

    async def swap(self, old: Panel | None, new: Panel) -> bool:
        result = await self._swap(
            keys=[self.keys.panels(new.job_id), self.keys.inflight()],
            args=[new.step, "" if old is None else old.to_json(), new.to_json(),
                  int(new.active), new.next_poll, new.member, RECORD_TTL_SECONDS],
        )
        return bool(result == 1)

    async def schedule(self, panel: Panel, at: float) -> None:
        # XX: only a panel still in flight; a finished one was removed and stays removed.
        await self._engine.client.zadd(self.keys.inflight(), {panel.member: at}, xx=True)

    async def due(self, now: float, limit: int) -> list[tuple[str, str]]:
        members = await self._engine.client.zrangebyscore(
            self.keys.inflight(), "-inf", now, start=0, num=limit
        )
        return [split_member(str(m)) for m in members]

    async def lease(self, key: str, owner: str, ttl: float) -> bool:
        return bool(await self._lease(keys=[self.keys.lease(key)], args=[owner, int(ttl * 1000)]) == 1)

    async def release(self, key: str, owner: str) -> None:
        await self._release(keys=[self.keys.lease(key)], args=[owner])


def _panel_order(panel: Panel) -> tuple[int, str]:
    digits = "".join(ch for ch in panel.step if ch.isdigit())
    return (int(digits) if digits else 0, panel.step)


# --- SQLite --------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS runpod_panels (
    job_id TEXT NOT NULL,
    step TEXT NOT NULL,
    record TEXT NOT NULL,
    active INTEGER NOT NULL,
    next_poll REAL NOT NULL,
    PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runpod_panels_due ON runpod_panels (active, next_poll);
"""


class SQLitePanelStore:
    """Its own table in the engine's file, through its own connection (WAL lets it share
    the file with the engine's writer thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[str, float]] = {}

    async def start(self) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SQLITE_SCHEMA)
            return db

        self._db = await asyncio.to_thread(connect)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def _run(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        def work() -> list[Any]:
            assert self._db is not None, "SQLitePanelStore used before start()"
            with self._lock:
                return self._db.execute(sql, params).fetchall()

        return await asyncio.to_thread(work)

    async def get(self, job_id: str, step: str) -> Panel | None:
        rows = await self._run(
            "SELECT record FROM runpod_panels WHERE job_id = ? AND step = ?", (job_id, step)
        )
        return Panel.from_json(rows[0][0]) if rows else None

    async def panels(self, job_id: str) -> list[Panel]:
        rows = await self._run("SELECT record FROM runpod_panels WHERE job_id = ?", (job_id,))
        return sorted((Panel.from_json(r[0]) for r in rows), key=_panel_order)

    async def swap(self, old: Panel | None, new: Panel) -> bool:
        def work() -> bool:
            assert self._db is not None, "SQLitePanelStore used before start()"
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute(
                        "SELECT record FROM runpod_panels WHERE job_id = ? AND step = ?",
                        (new.job_id, new.step),
                    ).fetchone()
                    current = None if row is None else row[0]
                    expected = None if old is None else old.to_json()
                    if current != expected:
                        self._db.execute("ROLLBACK")
                        return False
                    self._db.execute(
                        "INSERT OR REPLACE INTO runpod_panels VALUES (?, ?, ?, ?, ?)",
                        (new.job_id, new.step, new.to_json(), int(new.active), new.next_poll),
                    )
                    self._db.execute("COMMIT")
                    return True
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise

        return await asyncio.to_thread(work)

    async def schedule(self, panel: Panel, at: float) -> None:
        await self._run(
            "UPDATE runpod_panels SET next_poll = ? WHERE job_id = ? AND step = ? AND active = 1",
            (at, panel.job_id, panel.step),
        )

    async def due(self, now: float, limit: int) -> list[tuple[str, str]]:
        rows = await self._run(
            "SELECT job_id, step FROM runpod_panels WHERE active = 1 AND next_poll <= ? "
            "ORDER BY next_poll LIMIT ?",
            (now, limit),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def lease(self, key: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        holder = self._leases.get(key)
        if holder is None or holder[0] == owner or holder[1] <= now:
            self._leases[key] = (owner, now + ttl)
            return True
        return False

    async def release(self, key: str, owner: str) -> None:
        holder = self._leases.get(key)
        if holder is not None and holder[0] == owner:
            del self._leases[key]
