"""bench/charts.py: one line per system found in the results (whatever the systems are),
repeated points reduced to their median, SVG files written where asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import charts, report


def fanout(system: str, watchers: int, p50: float, cpu: float | None, transport: str = "ws") -> dict[str, Any]:
    return {
        "system": system, "transport": transport, "publisher": "tracker", "watchers": watchers,
        "latency_ms": {"p50": p50, "p90": p50 * 2, "p99": p50 * 4, "max": p50 * 8, "count": 10},
        "server_cpu_us_per_msg": cpu,
    }


def document(*results: dict[str, Any], transports: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"results": {"fanout": {r["system"]: r for r in results}, "transports": transports or {}}}


def test_points_take_every_system_and_the_median_of_repeats() -> None:
    docs = [
        document(fanout("phasecast-redis", 100, 1.0, 80), fanout("other-broker", 100, 3.0, None)),
        document(fanout("phasecast-redis", 100, 3.0, 90)),
        document(fanout("phasecast-redis", 100, 2.0, 100)),
        document(fanout("phasecast-redis", 1000, 5.0, 70)),
        document(transports={"sse": fanout("phasecast-redis", 100, 4.0, 120, transport="sse")}),
    ]
    found = {(p.series, p.watchers): p for p in charts.points(docs)}
    assert set(found) == {
        ("Phasecast (Redis)", 100), ("Phasecast (Redis)", 1000), ("other-broker", 100), ("Phasecast (Redis), SSE", 100)
    }
    assert found["Phasecast (Redis)", 100].p50 == 2.0
    assert found["Phasecast (Redis)", 100].cpu_us_per_msg == 90
    assert found["other-broker", 100].cpu_us_per_msg is None


def test_report_draws_svg_charts_of_the_results_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a-fanout.json").write_text(json.dumps(document(
        fanout("phasecast-redis", 200, 1.5, 80), fanout("socketio", 200, 3.0, 150), fanout("redis-floor", 200, 0.9, 70),
    )))
    (tmp_path / "b-fanout.json").write_text(json.dumps(document(
        fanout("phasecast-redis", 2000, 2.5, 90), fanout("socketio", 2000, 30.0, 160), fanout("nats-floor", 2000, 0.5, 20),
    )))
    (tmp_path / "c-ingest.json").write_text(json.dumps({"results": {"ingest": {}}}))
    (tmp_path / "broken.json").write_text("{")
    written = report.draw_charts(tmp_path)
    assert [p.name for p in written] == [charts.LATENCY_CHART, charts.CPU_CHART]
    latency = (tmp_path / charts.LATENCY_CHART).read_text()
    for label in ("Phasecast (Redis) p99", "python-socketio p50", "Redis PUBLISH floor (1 subscriber per job) p50", "nats-floor p99", "2,000"):
        assert label in latency, label
    assert "nats-floor" in (tmp_path / charts.CPU_CHART).read_text()


def test_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    assert report.draw_charts(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
