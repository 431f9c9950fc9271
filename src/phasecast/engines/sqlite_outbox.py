"""The archive outbox on SQLite (``SQLiteEngine.archive_outbox()``): two tables in the
engine's file, written through the engine's writer thread, so a record filed for PostgreSQL
survives a crash of the server (and of PostgreSQL) and is written when both are back."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phasecast.engines.sqlite import SQLiteEngine

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS archive_outbox_states ("
    " job_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS archive_outbox_events ("
    " key TEXT PRIMARY KEY, event TEXT NOT NULL, filed INTEGER NOT NULL)",
)


class SQLiteArchiveOutbox:
    def __init__(self, engine: SQLiteEngine) -> None:
        self._engine = engine

    async def start(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            for statement in SCHEMA:
                conn.execute(statement)

        await self._engine.execute(create)

    async def put(self, states: list[tuple[str, int, str]], events: list[tuple[str, str]]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO archive_outbox_states VALUES (?, ?, ?) ON CONFLICT (job_id) DO UPDATE"
                " SET seq = excluded.seq, state = excluded.state WHERE excluded.seq > seq", states)
            conn.executemany(
                "INSERT OR IGNORE INTO archive_outbox_events (key, event, filed)"
                " VALUES (?, ?, (SELECT coalesce(max(filed), 0) + 1 FROM archive_outbox_events))",
                events)

        await self._engine.execute(write)

    async def states(self, limit: int) -> list[tuple[str, int, str]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, int, str]]:
            rows = conn.execute("SELECT job_id, seq, state FROM archive_outbox_states LIMIT ?",
                                (limit,)).fetchall()
            return [(str(r[0]), int(r[1]), str(r[2])) for r in rows]

        return await self._engine.execute(read)

    async def events(self, limit: int) -> list[tuple[str, str]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute("SELECT key, event FROM archive_outbox_events ORDER BY filed LIMIT ?",
                                (limit,)).fetchall()
            return [(str(r[0]), str(r[1])) for r in rows]

        return await self._engine.execute(read)

    async def state(self, job_id: str) -> str | None:
        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT state FROM archive_outbox_states WHERE job_id = ?",
                               (job_id,)).fetchone()
            return None if row is None else str(row[0])

        return await self._engine.execute(read)

    async def ack(self, states: list[tuple[str, int]], events: list[str]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM archive_outbox_states WHERE job_id = ? AND seq = ?", states)
            conn.executemany("DELETE FROM archive_outbox_events WHERE key = ?", [(k,) for k in events])

        await self._engine.execute(write)

    async def size(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT (SELECT count(*) FROM archive_outbox_states)"
                               " + (SELECT count(*) FROM archive_outbox_events)").fetchone()
            return int(row[0])

        return await self._engine.execute(read)
