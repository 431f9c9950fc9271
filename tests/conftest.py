"""Shared fixtures: real engines, real servers, tokens.

Tests share the machine's Redis only through a unique key prefix per test, and delete their
keys afterwards; tests that kill, restart or flush Redis start a private redis-server.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.support.process import TEST_SECRET, ServerProcess
from tests.support.redis_servers import (
    RedisClusterProcesses,
    RedisSentinelProcesses,
    delete_prefix,
)

from phasecast.config import Settings
from phasecast.engines import Engine, open_engine
from phasecast.server.auth import mint_token
from phasecast.tracker import ProgressTracker

REDIS_URL = os.environ.get("PHASECAST_TEST_REDIS", "redis://127.0.0.1:6379/0")

TokenFactory = Callable[..., str]


def redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def test_settings() -> Settings:
    return Settings(jwt_secret=TEST_SECRET)


@pytest.fixture(scope="session")
def make_token(test_settings: Settings) -> TokenFactory:
    def make(sub: str = "alice", scopes: tuple[str, ...] = ("jobs:read",), ttl: int = 3600) -> str:
        return mint_token(test_settings, sub, scopes, ttl)

    return make


@pytest.fixture
def worker_token(make_token: TokenFactory) -> str:
    return make_token("worker", ("jobs:write",))


@contextlib.contextmanager
def private_prefix() -> Iterator[str]:
    """A key prefix of our own on the shared Redis, its keys removed afterwards."""
    if not redis_available():
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; start it (see README, Testing)")
    prefix = f"pctest-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        delete_prefix(REDIS_URL, prefix)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with private_prefix() as prefix:
        yield prefix


@pytest.fixture
def redis_engine_url(redis_prefix: str) -> str:
    return f"{REDIS_URL}?prefix={redis_prefix}"


@pytest.fixture
def sqlite_engine_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'phasecast.db'}"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A Redis Cluster of our own (three primaries, one replica each, on free ports), shared
    by the tests that only read and write it; tests that kill or reshard nodes start their
    own."""
    with RedisClusterProcesses() as cluster:
        yield cluster


@pytest.fixture
def cluster_engine_url(redis_cluster: RedisClusterProcesses) -> Iterator[str]:
    """The URL of one node of the shared cluster (the engine finds the others), with a key
    prefix of its own whose keys are deleted afterwards from every primary."""
    prefix = f"pctest-{uuid.uuid4().hex[:12]}"
    yield f"{redis_cluster.url}?prefix={prefix}"
    delete_prefix(redis_cluster.url, prefix)


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelProcesses]:
    """A primary, a replica and three sentinels (quorum 2) of our own, shared by the tests
    that only read and write them; a test that kills the primary starts its own."""
    with RedisSentinelProcesses() as deployment:
        yield deployment


@pytest.fixture
def sentinel_engine_url(redis_sentinel: RedisSentinelProcesses) -> Iterator[str]:
    """The ``redis+sentinel://`` URL of the shared deployment, with a key prefix of its own
    whose keys are deleted from the primary afterwards."""
    prefix = f"pctest-{uuid.uuid4().hex[:12]}"
    yield f"{redis_sentinel.url}?prefix={prefix}"
    delete_prefix(redis_sentinel.current_primary().url, prefix)


ENGINE_URL_FIXTURES = {
    "sqlite": "sqlite_engine_url",
    "redis": "redis_engine_url",
    "cluster": "cluster_engine_url",
    "sentinel": "sentinel_engine_url",
}


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def engine_url(request: pytest.FixtureRequest) -> str:
    """Every contract test runs once per engine: SQLite, a single Redis, a Redis Cluster."""
    url: str = request.getfixturevalue(ENGINE_URL_FIXTURES[request.param])
    return url


@pytest.fixture
async def engine(engine_url: str) -> AsyncIterator[Engine]:
    found = open_engine(engine_url)
    await found.start()
    yield found
    await found.stop()


@pytest.fixture
async def tracker(engine_url: str) -> AsyncIterator[ProgressTracker]:
    async with ProgressTracker(open_engine(engine_url)) as found:
        yield found


@pytest.fixture
def server(engine_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ``phasecast serve`` on each engine, with a short ping interval."""
    process = ServerProcess(
        engine_url,
        env={"PHASECAST_PING_INTERVAL": "1"},
        log_path=tmp_path / "server.log",
    )
    process.start()
    yield process
    process.stop()


# The engines a module's shared server runs on: SQLite, and the shared Redis (marked).
MODULE_ENGINES: tuple[tuple[str, tuple[pytest.MarkDecorator, ...]], ...] = (
    ("sqlite", ()),
    ("redis", (pytest.mark.redis,)),
)


def engine_variants(variants: Sequence[str]) -> list[Any]:
    """Fixture params for a module's server on every engine of MODULE_ENGINES crossed with
    ``variants`` (a server setting, such as a transport): ``(engine, variant)`` pairs with ids
    like ``redis-raw``."""
    return [
        pytest.param((engine, variant), id=f"{engine}-{variant}", marks=marks)
        for engine, marks in MODULE_ENGINES
        for variant in variants
    ]


@contextlib.contextmanager
def module_server_on(engine: str, folder: Path, env: Mapping[str, str]) -> Iterator[ServerProcess]:
    """A running ``phasecast serve`` for a module's tests: on ``sqlite`` (a database in
    ``folder``) or ``redis`` (a private key prefix on the shared Redis, its keys removed
    afterwards), with ``env`` and its log in ``folder``; stopped on the way out."""
    with contextlib.ExitStack() as stack:
        if engine == "sqlite":
            url = f"sqlite:///{folder / 'phasecast.db'}"
        else:
            url = f"{REDIS_URL}?prefix={stack.enter_context(private_prefix())}"
        process = ServerProcess(url, env=env, log_path=folder / "server.log")
        stack.enter_context(process)
        yield process


@pytest.fixture(scope="module", params=[pytest.param(e, marks=m) for e, m in MODULE_ENGINES])
def module_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per engine for a whole module, for tests that never restart it; each test
    uses job ids of its own."""
    with module_server_on(request.param, tmp_path_factory.mktemp("server"), {"PHASECAST_PING_INTERVAL": "1"}) as process:
        yield process


# Both ways /v1/ws can be served (PHASECAST_WS_TRANSPORT): our protocol writing pre-encoded
# frames, and plain ASGI. WebSocket tests run over both.
WS_TRANSPORTS = ("raw", "asgi")


@pytest.fixture(scope="module")
def ws_transport_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """One SQLite server per WebSocket transport for a module's tests, by transport name,
    for tests that compare what the two answer over raw sockets."""
    with contextlib.ExitStack() as stack:
        found = {}
        for transport in WS_TRANSPORTS:
            folder = tmp_path_factory.mktemp(f"ws-{transport}")
            found[transport] = stack.enter_context(ServerProcess(
                f"sqlite:///{folder / 'db.sqlite'}", env={"PHASECAST_WS_TRANSPORT": transport},
                log_path=folder / "server.log",
            ))
        yield found


@pytest.fixture(scope="module", params=engine_variants(WS_TRANSPORTS))
def ws_module_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Like ``module_server``, once per engine and WebSocket transport."""
    engine, transport = request.param
    env = {"PHASECAST_PING_INTERVAL": "1", "PHASECAST_WS_TRANSPORT": transport}
    with module_server_on(engine, tmp_path_factory.mktemp("server"), env) as process:
        yield process


# --- delivery latency, reported at the end of the run (measured, never asserted) --------

LATENCIES: dict[str, list[float]] = {}


@pytest.fixture
def record_latency() -> Callable[[str, float], None]:
    def record(label: str, seconds: float) -> None:
        LATENCIES.setdefault(label, []).append(seconds)

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LATENCIES:
        return
    terminalreporter.section("delivery latency (change accepted -> watcher read it)")
    for label, values in sorted(LATENCIES.items()):
        ordered = sorted(values)

        def pct(p: float, ordered: list[float] = ordered) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

        terminalreporter.write_line(
            f"{label}: n={len(ordered)} p50={pct(0.5):.1f} ms p99={pct(0.99):.1f} ms "
            f"max={ordered[-1] * 1000:.1f} ms"
        )
