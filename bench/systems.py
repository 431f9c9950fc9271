"""The systems under test, each started as its own process: ``phasecast serve`` on Redis or
SQLite, the python-socketio baseline, and a private ``redis-server`` for all of them."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.support.process import PrivateRedis, ServerProcess, free_port, wait_for_port
from tests.support.redis_servers import RedisClusterProcesses

from bench.common import VIEWER, stop_process, token
from bench.control import child_env

# Extra environment for every ``phasecast serve`` started (``--server-src`` sets PYTHONPATH
# to another checkout's ``src`` for before/after comparisons of the server alone).
SERVER_ENV: dict[str, str] = {}


@dataclass
class System:
    """A running server under test: what the load generator and publisher need to know."""

    kind: str  # phasecast | socketio | raw-floor | redis-floor
    engine: str  # redis | sqlite
    port: int
    pid: int
    engine_url: str = ""
    redis_url: str = ""
    redis_pid: int | None = None
    channel: str = ""
    jobs: list[str] = field(default_factory=list)
    server: ServerProcess | None = None


@contextlib.contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis().start()
    try:
        yield redis
    finally:
        redis.stop()


@contextlib.contextmanager
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """Three primaries with one replica each (``tests/support/redis_servers.py``)."""
    cluster = RedisClusterProcesses().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def phasecast(
    engine: str,
    redis: PrivateRedis | None,
    env: dict[str, str] | None = None,
    cluster: RedisClusterProcesses | None = None,
    workers: int = 1,
) -> Iterator[System]:
    """``phasecast serve`` via ``ServerProcess`` (the real command, TEST_SECRET set);
    ``workers`` > 1 runs ``serve --workers N`` (metered as the whole process tree)."""
    workdir = Path(tempfile.mkdtemp(prefix="phasecast-bench-"))
    if cluster is not None:
        engine_url = f"{cluster.url}?prefix=bench-{uuid.uuid4().hex[:8]}"
    elif engine == "redis":
        assert redis is not None
        engine_url = f"{redis.url}?prefix=bench-{uuid.uuid4().hex[:8]}"
    else:
        engine_url = f"sqlite:///{workdir / 'bench.db'}"
    server = ServerProcess(
        engine_url,
        args=["--workers", str(workers)] if workers > 1 else [],
        env={"PHASECAST_LOG_LEVEL": "warning", **SERVER_ENV, **(env or {})},
        log_path=workdir / "server.log",
    )
    server.start(timeout=60)
    try:
        yield System(
            "phasecast",
            engine,
            server.port,
            server.pid,
            engine_url=engine_url,
            redis_url=redis.url if redis else "",
            # On a cluster, Redis CPU is spread over six processes: not metered.
            redis_pid=redis.process.pid if redis and redis.process and cluster is None else None,
            server=server,
        )
    finally:
        server.stop()
        # The database goes; the server log stays in the temporary directory for post-mortems.
        for path in workdir.glob("bench.db*"):
            path.unlink()


@contextlib.contextmanager
def _pubsub_fed_server(name: str, module: str, redis: PrivateRedis, log: Path | None) -> Iterator[System]:
    """A server process ``python -m <module> <port> <redis url> <channel>`` fed through Redis
    pub/sub by the bench publisher; its output goes to ``log`` (or nowhere)."""
    port = free_port()
    channel = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        output: Any = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(port), redis.url, channel],
            stdout=output,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env=child_env(),
        )
    try:
        wait_for_port(port, 30, process)
        yield System(
            name,
            "redis",
            port,
            process.pid,
            redis_url=redis.url,
            redis_pid=redis.process.pid if redis.process else None,
            channel=channel,
        )
    finally:
        stop_process(process)


@contextlib.contextmanager
def socketio_server(redis: PrivateRedis) -> Iterator[System]:
    # Its log stays in the temporary directory for post-mortems.
    log = Path(tempfile.mkstemp(prefix="bench-sio-", suffix=".log")[1])
    with _pubsub_fed_server("socketio", "bench.sio_server", redis, log) as system:
        yield system


@contextlib.contextmanager
def raw_floor_server(redis: PrivateRedis) -> Iterator[System]:
    """``bench.floor_server``: uvloop, pre-encoded frames, ``transport.write`` (the floor row)."""
    with _pubsub_fed_server("raw-floor", "bench.floor_server", redis, None) as system:
        yield system


def redis_floor(redis: PrivateRedis) -> System:
    """No server at all: publisher → Redis → one plain subscriber. Its 'server' is Redis."""
    assert redis.process is not None
    return System(
        "redis-floor",
        "redis",
        redis.port,
        redis.process.pid,
        redis_url=redis.url,
        redis_pid=None,
        channel=f"bench-floor-{uuid.uuid4().hex[:8]}",
    )


def create_jobs(system: System, count: int, tag: str) -> list[str]:
    """Phasecast jobs through the real REST API, owned by the watchers' user; for the
    baselines, just the ids (rooms and channels need no creation)."""
    ids = [f"bench-{tag}-{k:05d}" for k in range(count)]
    if system.kind == "phasecast":
        headers = {"Authorization": f"Bearer {token(['jobs:write'], sub='bench-worker')}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{system.port}", headers=headers, timeout=30) as client:
            for job_id in ids:
                reply = client.post("/v1/jobs", json={"kind": "comic", "job_id": job_id, "owner": VIEWER})
                reply.raise_for_status()
    system.jobs = ids
    return ids
