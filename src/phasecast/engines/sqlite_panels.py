"""The RunPod integration's panel records on SQLite (``SQLiteEngine.panel_records()``): a
table of their own in the engine's file, written through the engine's own writer thread (no
second connection). One process serves an SQLite file, so leases live in memory."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phasecast.engines.sqlite import SQLiteEngine

SCHEMA = """
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


class SQLitePanelRecords:
    def __init__(self, engine: SQLiteEngine) -> None:
        self._engine = engine
        self._leases: dict[str, tuple[str, float]] = {}

    async def start(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

        await self._engine.execute(create)

    async def get(self, job_id: str, step: str) -> str | None:
        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT record FROM runpod_panels WHERE job_id = ? AND step = ?",
                               (job_id, step)).fetchone()
            return None if row is None else str(row[0])

        return await self._engine.execute(read)

    async def all(self, job_id: str) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT record FROM runpod_panels WHERE job_id = ?", (job_id,)).fetchall()
            return [str(r[0]) for r in rows]

        return await self._engine.execute(read)

    async def swap(
        self, job_id: str, step: str, old: str | None, new: str, *, active: bool, next_poll: float
    ) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT record FROM runpod_panels WHERE job_id = ? AND step = ?",
                               (job_id, step)).fetchone()
            if (None if row is None else row[0]) != old:
                return False
            conn.execute("INSERT OR REPLACE INTO runpod_panels VALUES (?, ?, ?, ?, ?)",
                         (job_id, step, new, int(active), next_poll))
            return True

        return await self._engine.execute(write)

    async def schedule(self, job_id: str, step: str, at: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE runpod_panels SET next_poll = ?"
                         " WHERE job_id = ? AND step = ? AND active = 1", (at, job_id, step))

        await self._engine.execute(write)

    async def unindex(self, job_id: str, step: str) -> None:
        return None  # the index is the ``active`` column of the record itself

    async def due(self, now: float, limit: int) -> list[tuple[str, str]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT job_id, step FROM runpod_panels WHERE active = 1 AND next_poll <= ? "
                "ORDER BY next_poll LIMIT ?", (now, limit)).fetchall()
            return [(str(r[0]), str(r[1])) for r in rows]

        return await self._engine.execute(read)

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
