"""The benchmark harness, run small and short so it cannot rot: it must start its own
processes, drive them, and report a well-formed result with nothing lost. Timings are not
checked (they depend on the machine); behaviour is."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report, scenarios

pytestmark = pytest.mark.slow

LATENCY_KEYS = {"p50", "p90", "p99", "max", "count"}


def _well_formed_fanout(result: dict[str, Any], watchers: int) -> None:
    assert result["connected"] == watchers
    assert result["connect_failures"] == 0
    assert result["updates_applied"] > 0
    assert result["expected_messages"] == result["updates_applied"] * watchers // result["jobs"]
    assert result["delivered_messages"] == result["expected_messages"]
    assert result["lost"] == 0
    assert result["out_of_order"] == 0
    assert set(result["latency_ms"]) == LATENCY_KEYS
    assert result["latency_ms"]["count"] == result["delivered_messages"]
    assert result["server_cpu_s"] >= 0
    assert result["rss_after_kb"] > 0


@pytest.mark.redis
def test_fanout_websocket_on_redis_loses_nothing() -> None:
    result = scenarios.fanout("phasecast-redis", watchers=20, jobs=4, rate=20, seconds=2)
    _well_formed_fanout(result, 20)
    assert result["transport"] == "ws"


def test_fanout_sse_on_sqlite_through_http_loses_nothing() -> None:
    result = scenarios.fanout(
        "phasecast-sqlite", watchers=10, jobs=2, rate=10, seconds=2, transport="sse", publisher="http"
    )
    _well_formed_fanout(result, 10)


@pytest.mark.redis
def test_socketio_baseline_and_report_table() -> None:
    ours = scenarios.fanout("phasecast-redis", watchers=10, jobs=2, rate=10, seconds=1)
    theirs = scenarios.fanout("socketio", watchers=10, jobs=2, rate=10, seconds=1)
    _well_formed_fanout(theirs, 10)
    table = report.markdown({"fanout": {"phasecast-redis": ours, "socketio": theirs}})
    assert "| delivered msgs/s |" in table
    assert "python-socketio" in table
    assert "### Targets" in table


@pytest.mark.redis
def test_raw_socket_floor_delivers_everything_and_sits_in_the_table() -> None:
    """The floor row: the raw uvloop server fed by Redis pub/sub, read by the same WebSocket
    load generator as Phasecast, in the same report."""
    ours = scenarios.fanout("phasecast-redis", watchers=10, jobs=2, rate=10, seconds=1)
    floor = scenarios.fanout("raw-floor", watchers=10, jobs=2, rate=10, seconds=1)
    _well_formed_fanout(floor, 10)
    assert floor["transport"] == "ws"
    assert floor["publisher"] == "redis"
    assert floor["uptime_before"].count(" ") == 2
    table = report.markdown({"fanout": {"phasecast-redis": ours, "raw-floor": floor}})
    assert "| raw-socket floor |" in table
    assert "1.5x the raw-socket floor" in table


@pytest.mark.redis
def test_fanout_with_two_workers_and_several_source_addresses() -> None:
    """``serve --workers 2`` metered as a process tree; watchers from 127.0.0.2 and .3."""
    result = scenarios.fanout(
        "phasecast-redis", watchers=12, jobs=3, rate=12, seconds=1, workers=2, sources=2, loadgen_procs=2
    )
    _well_formed_fanout(result, 12)
    assert result["workers"] == 2
    assert result["server_cpu_s"] > 0


@pytest.mark.redis
def test_ingest_reports_accepted_updates() -> None:
    result = scenarios.ingest("phasecast-redis", mode="http", seconds=1, jobs=4, concurrency=4)
    assert result["applied"] > 0
    assert result["errors"] == {}
    assert result["accepted_per_s"] > 0


@pytest.mark.redis
@pytest.mark.parametrize("system", ["phasecast-sqlite", "floor-raw", "floor-rawpipe", "floor-asgi"])
@pytest.mark.parametrize("mode", ["http", "batch"])
def test_ingest_floors_and_batches_count_every_report(system: str, mode: str) -> None:
    """The pipelining load generator against Phasecast and both floor servers: every report
    answered, applied counted from the answers."""
    shape = {"connections": 2, "window": 2, "batch_size": 10} if mode == "batch" else {"connections": 2, "window": 3}
    result = scenarios.ingest(system, mode=mode, seconds=1, jobs=8, concurrency=4, http=shape)
    assert result["errors"] == {}
    assert result["applied"] > 0 and result["accepted_per_s"] > 0
    assert result["server_cpu_s"] > 0 and result["publisher_cpu_us_per_update"] > 0
    assert result["load"] == shape


@pytest.mark.parametrize("system", ["phasecast-redis", "phasecast-sqlite"])
def test_storm_resyncs_every_watcher_in_order(system: str) -> None:
    result = scenarios.storm(system, watchers=60, jobs=6)
    assert result["connected"] == result["resynced"] == 60
    assert result["out_of_order"] == 0 and result["watchers_behind"] == 0
    assert result["seconds_from_ready"] is not None
    assert result["server_cpu_us_per_reconnect"] >= 0
    assert result["listen_drops"] >= 0


def test_storm_with_workers_kills_and_restarts_every_process() -> None:
    """``serve --workers 2``: the storm kills the supervisor and its workers (a worker left
    alive would keep serving the watchers and hide the storm), restarts them, and every
    watcher resyncs."""
    result = scenarios.storm("phasecast-redis", watchers=60, jobs=6, workers=2)
    assert result["workers"] == 2
    assert result["connected"] == result["resynced"] == 60
    assert result["reconnects"] >= 60
    assert result["out_of_order"] == 0 and result["watchers_behind"] == 0
