"""Durable job records in PostgreSQL, against real PostgreSQL servers: a database of this
session's own on the machine's PostgreSQL (dropped afterwards), and a private cluster (initdb
on a free port) for the test that stops PostgreSQL in the middle of a job."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from tests.support.clients import WSWatcher
from tests.support.process import PrivateRedis, ServerProcess, free_port

from phasecast.archive import MIGRATIONS, PostgresArchive, migrate, open_archive
from phasecast.engines import open_engine
from phasecast.errors import ConfigurationError
from phasecast.model import JobError, Phase
from phasecast.tracker import ProgressTracker

pytestmark = pytest.mark.postgres

SHARED_PG = os.environ.get("PHASECAST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.fail(f"{name} not found: install the PostgreSQL server binaries (postgresql package)")
    return found[-1]


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class PrivatePostgres:
    """A PostgreSQL cluster of our own (trust auth, free port, temp dir) that tests may stop
    and start; the machine's PostgreSQL is never touched."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="phasecast-pg-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> PrivatePostgres:
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                                     "--auth=trust", "--no-sync"]),
                       check=True, capture_output=True)
        return self.start()

    def start(self) -> PrivatePostgres:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options,
                                     "-l", str(self.dir / "log"), "-w", "-t", "30", "start"]),
                       check=True, capture_output=True)
        return self

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
                       check=False, capture_output=True)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def archive_url() -> Iterator[str]:
    """A database of this session's own on the shared PostgreSQL, dropped afterwards."""
    name = f"pctest_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(SHARED_PG, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {SHARED_PG} ({exc}); start it (see README)")
    yield SHARED_PG.rsplit("/", 1)[0] + f"/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres().init()
    yield cluster
    cluster.destroy()


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        rows: list[asyncpg.Record] = await connection.fetch(sql, *args)
        return rows
    finally:
        await connection.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20, what: str = "condition") -> None:
    """Poll something we cannot subscribe to (a PostgreSQL table) until a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except (OSError, asyncpg.PostgresError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.05)


async def archived_phase(url: str, job_id: str) -> str | None:
    rows = await fetch(url, "SELECT phase FROM jobs WHERE job_id = $1", job_id)
    return rows[0]["phase"] if rows else None


async def drive(api: httpx.AsyncClient, job_id: str, *, complete: bool = True) -> None:
    for body in ({"phase": "ANALYZING", "phase_progress": 50}, {"phase": "ANALYZING", "phase_progress": 100},
                 {"phase": "GENERATING", "step": "panel-1", "step_progress": 100, "steps_total": 2},
                 {"phase": "GENERATING", "step": "panel-2", "step_progress": 100},
                 {"phase": "POST_PROCESSING", "phase_progress": 100}):
        reply = await api.post(f"/v1/jobs/{job_id}/progress", json=body)
        assert reply.status_code == 200, reply.text
    if complete:
        reply = await api.post(f"/v1/jobs/{job_id}/complete", json={})
        assert reply.status_code == 200, reply.text


# --- the archive on its own ---------------------------------------------------------------


def test_archive_urls_must_be_postgresql() -> None:
    with pytest.raises(ConfigurationError, match="postgresql://"):
        open_archive("mysql://localhost/db")


async def test_migrations_create_the_tables_once(archive_url: str) -> None:
    pool = await asyncpg.create_pool(archive_url, min_size=1, max_size=2)
    try:
        assert await migrate(pool) == 2
        assert await migrate(pool) == 2  # a second instance starting changes nothing
        tables = {r["tablename"] for r in await pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"jobs", "job_events", "phasecast_schema_migrations"} <= tables
        versions = [r["version"] for r in await pool.fetch("SELECT version FROM phasecast_schema_migrations")]
        assert sorted(versions) == [1, 2]
    finally:
        await pool.close()


async def test_migration_2_keeps_one_event_per_phase_and_enforces_it() -> None:
    """A database written by version 1 (with duplicate phase rows from alternating instances)
    is cleaned up, keeping each phase's earliest row, and the key makes a duplicate impossible."""
    name = f"pcmig_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(SHARED_PG, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = SHARED_PG.rsplit("/", 1)[0] + f"/{name}"
    try:
        connection = await asyncpg.connect(url, timeout=5)
        try:
            await connection.execute(MIGRATIONS[0][1])
            await connection.execute("CREATE TABLE phasecast_schema_migrations (version integer PRIMARY KEY,"
                                     " applied_at timestamptz NOT NULL DEFAULT now())")
            await connection.execute("INSERT INTO phasecast_schema_migrations (version) VALUES (1)")
            await connection.execute(
                "INSERT INTO jobs VALUES ('j', 'alice', 'default', 'GENERATING', false, 50, 9, 'e1', now(), now(),"
                " NULL, NULL, '{}'::jsonb)")
            for seq, phase in ((1, "QUEUED"), (2, "ANALYZING"), (5, "GENERATING"), (7, "GENERATING"),
                               (9, "GENERATING")):
                await connection.execute(
                    "INSERT INTO job_events VALUES ('j', 'e1', $1, now(), $2, 0, 0, '', NULL)", seq, phase)
        finally:
            await connection.close()
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            assert await migrate(pool) == 2
            rows = await pool.fetch("SELECT phase, seq FROM job_events WHERE job_id = 'j' ORDER BY seq")
            assert [(r["phase"], r["seq"]) for r in rows] == [("QUEUED", 1), ("ANALYZING", 2), ("GENERATING", 5)]
            with pytest.raises(asyncpg.UniqueViolationError):
                await pool.execute("INSERT INTO job_events VALUES ('j', 'e1', 11, now(), 'GENERATING', 0, 0, '', NULL)")
        finally:
            await pool.close()
    finally:
        admin = await asyncpg.connect(SHARED_PG, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def archived_tracker(archive_url: str, tmp_path: Path) -> AsyncIterator[ProgressTracker]:
    async with ProgressTracker(open_engine(f"sqlite:///{tmp_path / 'a.db'}"),
                               archive=open_archive(archive_url)) as tracker:
        yield tracker


async def test_every_phase_change_and_the_ending_are_recorded(
    archived_tracker: ProgressTracker, archive_url: str
) -> None:
    tracker = archived_tracker
    job_id = f"timeline-{uuid.uuid4().hex[:8]}"
    await tracker.create(owner="alice", job_id=job_id, metadata={"title": "Moon Bakery"})
    for percent in (10, 60, 100):
        await tracker.report(job_id, Phase.ANALYZING, percent)
    for panel in (1, 2, 3):
        await tracker.step(job_id, Phase.GENERATING, f"panel-{panel}", 100, steps_total=3)
    await tracker.report(job_id, Phase.POST_PROCESSING, 100)
    final = (await tracker.complete(job_id)).state

    async def written() -> bool:
        return await archived_phase(archive_url, job_id) == "COMPLETE"

    await until(written, what="the COMPLETE record")
    row = (await fetch(archive_url, "SELECT * FROM jobs WHERE job_id = $1", job_id))[0]
    assert row["seq"] == final.seq and row["owner"] == "alice" and row["terminal"]
    events = await fetch(archive_url, "SELECT phase, seq FROM job_events WHERE job_id = $1 ORDER BY seq",
                         job_id)
    # One event per phase entered plus the ending, not one per progress update.
    assert [e["phase"] for e in events] == ["QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]


async def test_failed_jobs_keep_their_error(archived_tracker: ProgressTracker, archive_url: str) -> None:
    job_id = f"failing-{uuid.uuid4().hex[:8]}"
    await archived_tracker.create(owner="bob", job_id=job_id)
    await archived_tracker.fail(job_id, "gpu_oom", "panel 3: out of memory")

    async def written() -> bool:
        return await archived_phase(archive_url, job_id) == "FAILED"

    await until(written, what="the FAILED record")
    row = (await fetch(archive_url, "SELECT error_code, error_message FROM jobs WHERE job_id = $1", job_id))[0]
    assert (row["error_code"], row["error_message"]) == ("gpu_oom", "panel 3: out of memory")


async def test_a_state_postgres_cannot_hold_as_it_is_never_holds_the_archive_back(
    archived_tracker: ProgressTracker, archive_url: str
) -> None:
    """New text with a NUL is refused (PostgreSQL keeps none), but a state stored before that
    rule may hold one in its message, owner, error or metadata. It is archived with U+FFFD in
    the NUL's place, and the records after it are not held back."""
    tracker = archived_tracker
    assert tracker.archive is not None
    legacy = f"legacy-{uuid.uuid4().hex[:8]}"
    state = await tracker.create(owner="alice", job_id=legacy)
    # As stored by an older release (before the rule), straight to the archive.
    old = state.copy()
    old.owner, old.message, old.seq = "al\x00ice", "Drawing\x00 panel \\u0000 1", state.seq + 1
    old.phase, old.error = Phase.FAILED, JobError("c\x00", "out of memory\x00")
    old.metadata = {"k\x00": ["v\x00", {"\\u0000": "\x00"}]}
    tracker.archive.record(old)
    later = f"later-{uuid.uuid4().hex[:8]}"
    await tracker.create(owner="bob", job_id=later)
    await tracker.complete(later)

    async def both_written() -> bool:
        return (await archived_phase(archive_url, legacy), await archived_phase(archive_url, later)) == (
            "FAILED", "COMPLETE")

    await until(both_written, what="the legacy record and the one after it")
    row = (await fetch(archive_url, "SELECT owner, error_code, error_message, state::text AS state"
                                    " FROM jobs WHERE job_id = $1", legacy))[0]
    assert (row["owner"], row["error_code"], row["error_message"]) == ("al\ufffdice", "c\ufffd",
                                                                       "out of memory\ufffd")
    kept = json.loads(row["state"])
    assert kept["message"] == "Drawing\ufffd panel \\u0000 1"  # an escaped backslash stays as it was
    assert kept["metadata"] == {"k\ufffd": ["v\ufffd", {"\\u0000": "\ufffd"}]}
    event = (await fetch(archive_url, "SELECT message FROM job_events WHERE job_id = $1 AND phase = 'FAILED'",
                         legacy))[0]
    assert event["message"] == "Drawing\ufffd panel \\u0000 1"


async def test_recording_never_waits_for_an_unreachable_postgres(tmp_path: Path) -> None:
    archive = PostgresArchive(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    async with ProgressTracker(open_engine(f"sqlite:///{tmp_path / 'b.db'}"), archive=archive) as tracker:
        await tracker.create(owner="alice", job_id="offline")
        for percent in range(1, 101):
            await tracker.report("offline", Phase.ANALYZING, percent)
        assert (await tracker.get("offline")).phase_progress == 100
        assert archive.pending >= 1  # filed, waiting for PostgreSQL
        assert archive.written == 0


# --- Must show: FLUSHALL, and PostgreSQL stopped during a job ------------------------------


@pytest.mark.redis
async def test_after_flushall_a_finished_job_is_answered_from_the_archive(
    archive_url: str, tmp_path: Path, make_token: Callable[..., str], worker_token: str
) -> None:
    job_id = f"flushed-{uuid.uuid4().hex[:8]}"
    with PrivateRedis() as private, ServerProcess(
        private.url, env={"PHASECAST_ARCHIVE": archive_url}, log_path=tmp_path / "server.log"
    ) as server:
        async with httpx.AsyncClient(base_url=server.url,
                                     headers={"Authorization": f"Bearer {worker_token}"}) as api:
            assert (await api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
            await drive(api, job_id)
            before = (await api.get(f"/v1/jobs/{job_id}")).json()
            assert before["phase"] == "COMPLETE"

            async def written() -> bool:
                return await archived_phase(archive_url, job_id) == "COMPLETE"

            await until(written, what="the COMPLETE record")
            admin = aioredis.Redis.from_url(private.url)
            await admin.flushall()
            assert await admin.dbsize() == 0
            await admin.aclose()

            viewer = {"Authorization": f"Bearer {make_token('alice')}"}
            after = await api.get(f"/v1/jobs/{job_id}", headers=viewer)
            assert after.status_code == 200, after.text
            restored = after.json()
            assert restored["phase"] == "COMPLETE" and restored["progress"] == 100.0
            assert restored["epoch"] != before["epoch"]  # history was lost: watchers can tell
            assert restored["seq"] == before["seq"] + 1  # and seq never goes down
            assert restored["phases"] == before["phases"]
            # Another user still may not read it.
            other = await api.get(f"/v1/jobs/{job_id}",
                                  headers={"Authorization": f"Bearer {make_token('mallory')}"})
            assert other.status_code == 403
            # A watcher gets the restored state, and a never-existing job is still 404.
            watcher = await WSWatcher(server.url, make_token("alice")).connect()
            await watcher.subscribe(job_id)
            seen = await watcher.wait_terminal(job_id)
            assert seen.state["epoch"] == restored["epoch"]
            await watcher.close()
            assert (await api.get("/v1/jobs/never-was")).status_code == 404


@pytest.mark.redis
async def test_a_job_survives_postgres_stopping_and_its_record_appears_when_back(
    private_postgres: PrivatePostgres, redis_engine_url: str, tmp_path: Path,
    make_token: Callable[..., str], worker_token: str,
) -> None:
    job_id = f"pg-down-{uuid.uuid4().hex[:8]}"
    with ServerProcess(redis_engine_url, env={"PHASECAST_ARCHIVE": private_postgres.url},
                       log_path=tmp_path / "server.log") as server:
        async with httpx.AsyncClient(base_url=server.url,
                                     headers={"Authorization": f"Bearer {worker_token}"}) as api:
            assert (await api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201

            async def created() -> bool:
                return await archived_phase(private_postgres.url, job_id) == "QUEUED"

            await until(created, what="the QUEUED record")
            watcher = await WSWatcher(server.url, make_token("alice")).connect()
            await watcher.subscribe(job_id)
            await watcher.wait_seq(job_id, 1)

            private_postgres.stop("immediate")  # PostgreSQL goes away mid-job
            await drive(api, job_id)
            final = await watcher.wait_terminal(job_id)
            assert final.state["phase"] == "COMPLETE"
            assert watcher.seqs(job_id) == list(range(1, final.state["seq"] + 1))
            await watcher.close()

            private_postgres.start()

            async def caught_up() -> bool:
                return await archived_phase(private_postgres.url, job_id) == "COMPLETE"

            await until(caught_up, timeout=30, what="the archive catching up")
            row = (await fetch(private_postgres.url, "SELECT seq, progress FROM jobs WHERE job_id = $1",
                               job_id))[0]
            assert row["seq"] == final.state["seq"] and row["progress"] == 100.0
            events = await fetch(private_postgres.url,
                                 "SELECT phase FROM job_events WHERE job_id = $1 ORDER BY seq", job_id)
            assert [e["phase"] for e in events] == [
                "QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]
        assert "archive cannot write to PostgreSQL" in server.log()


@pytest.mark.redis
async def test_a_running_job_whose_redis_state_was_flushed_carries_on(
    archive_url: str
) -> None:
    """Redis restarted empty mid-job: the next update restores the job from the archive with
    a new epoch and applies on top of it."""
    with PrivateRedis() as private:
        archive = open_archive(archive_url)
        async with ProgressTracker(open_engine(private.url), archive=archive) as tracker:
            job_id = f"midway-{uuid.uuid4().hex[:8]}"
            await tracker.create(owner="alice", job_id=job_id)
            before = (await tracker.report(job_id, Phase.ANALYZING, 40)).state

            async def written() -> bool:
                return archive.pending == 0

            await until(written, what="the archive write")
            admin = aioredis.Redis.from_url(private.url)
            await admin.flushall()
            await admin.aclose()
            after = (await tracker.report(job_id, Phase.ANALYZING, 70)).state
            assert after.epoch != before.epoch
            assert after.seq == before.seq + 2  # the restore, then this update
            assert after.phase_progress == 70


# --- exactly one row per phase; the outbox across a crash while PostgreSQL is down ---------

PHASES = ["QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]


@pytest.mark.redis
async def test_alternating_instances_write_one_event_per_phase(
    archive_url: str, redis_engine_url: str, tmp_path: Path, worker_token: str
) -> None:
    job_id = f"alternating-{uuid.uuid4().hex[:8]}"
    env = {"PHASECAST_ARCHIVE": archive_url}
    with (ServerProcess(redis_engine_url, env=env, log_path=tmp_path / "a.log") as a,
          ServerProcess(redis_engine_url, env=env, log_path=tmp_path / "b.log") as b):
        headers = {"Authorization": f"Bearer {worker_token}"}
        async with (httpx.AsyncClient(base_url=a.url, headers=headers) as api_a,
                    httpx.AsyncClient(base_url=b.url, headers=headers) as api_b):
            assert (await api_a.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
            reports = [{"phase": "ANALYZING", "phase_progress": p} for p in (10, 40, 70, 100)]
            reports += [{"phase": "GENERATING", "phase_progress": p} for p in (5, 30, 60, 90)]
            reports += [{"phase": "POST_PROCESSING", "phase_progress": p} for p in (20, 80)]
            entered: dict[str, int] = {"QUEUED": 1}
            for number, body in enumerate(reports):
                api = (api_a, api_b)[number % 2]  # every change through the other instance
                reply = await api.post(f"/v1/jobs/{job_id}/progress", json=body)
                assert reply.status_code == 200, reply.text
                entered.setdefault(body["phase"], reply.json()["state"]["seq"])
            final = await api_b.post(f"/v1/jobs/{job_id}/complete", json={})
            entered["COMPLETE"] = final.json()["state"]["seq"]

            async def written() -> bool:
                return await archived_phase(archive_url, job_id) == "COMPLETE"

            await until(written, what="the COMPLETE record")
    # Both servers stopped (each flushes what it filed): every row either could write is in.
    events = await fetch(archive_url, "SELECT phase, seq FROM job_events WHERE job_id = $1 ORDER BY seq", job_id)
    assert [(e["phase"], e["seq"]) for e in events] == [(phase, entered[phase]) for phase in PHASES]


def _outbox_holds(engine_url: str, job_id: str, seq: int) -> Callable[[], Awaitable[bool]]:
    """Whether the engine's archive outbox holds ``job_id`` at ``seq`` and its four later
    phase events (read from the engine's store, as a crash would leave it)."""
    if engine_url.startswith("sqlite"):
        import sqlite3

        path = engine_url.removeprefix("sqlite:///")

        async def check_sqlite() -> bool:
            with sqlite3.connect(path) as db:
                row = db.execute("SELECT seq FROM archive_outbox_states WHERE job_id = ?", (job_id,)).fetchone()
                events = db.execute("SELECT count(*) FROM archive_outbox_events WHERE key LIKE ?",
                                    (f"{job_id}\x1f%",)).fetchone()[0]
            return row is not None and row[0] == seq and events == 4

        return check_sqlite
    from urllib.parse import parse_qs, urlsplit

    from phasecast.engines.redis import RedisEngine
    from phasecast.engines.redis_keys import RedisKeys

    keys = RedisKeys(parse_qs(urlsplit(engine_url).query)["prefix"][0])

    async def check_redis() -> bool:
        # Through the engine's own client: on a Redis Cluster, a cluster client.
        engine = RedisEngine(engine_url)
        await engine.start()
        try:
            client = engine.client
            raw = await client.hget(keys.archive_states(), job_id)
            events = [k for k in await client.hkeys(keys.archive_events()) if k.startswith(f"{job_id}\x1f")]
        finally:
            await engine.stop()
        return raw is not None and raw.startswith(f"{seq}|") and len(events) == 4

    return check_redis


async def test_records_filed_while_postgres_is_down_survive_a_server_crash(
    private_postgres: PrivatePostgres, engine_url: str, tmp_path: Path, worker_token: str
) -> None:
    job_id = f"crash-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(engine_url, env={"PHASECAST_ARCHIVE": private_postgres.url},
                           log_path=tmp_path / "server.log")
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url,
                                     headers={"Authorization": f"Bearer {worker_token}"}) as api:
            assert (await api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201

            async def created() -> bool:
                return await archived_phase(private_postgres.url, job_id) == "QUEUED"

            await until(created, what="the QUEUED record")
            private_postgres.stop("immediate")
            await drive(api, job_id)
            final = (await api.get(f"/v1/jobs/{job_id}")).json()
            assert final["phase"] == "COMPLETE"
        await until(_outbox_holds(engine_url, job_id, final["seq"]), what="the records in the engine's outbox")
        server.kill()  # SIGKILL while PostgreSQL is down: nothing flushes
        private_postgres.start()
        server.start()

        async def caught_up() -> bool:
            return await archived_phase(private_postgres.url, job_id) == "COMPLETE"

        await until(caught_up, timeout=30, what="the outbox replayed into PostgreSQL")
        row = (await fetch(private_postgres.url, "SELECT seq FROM jobs WHERE job_id = $1", job_id))[0]
        assert row["seq"] == final["seq"]
        events = await fetch(private_postgres.url, "SELECT phase FROM job_events WHERE job_id = $1 ORDER BY seq",
                             job_id)
        assert [e["phase"] for e in events] == PHASES
        assert "replaying" in server.log()
    finally:
        server.stop()
