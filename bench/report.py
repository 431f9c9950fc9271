"""Markdown tables and target verdicts from a run's results."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def median_of(runs: list[Result]) -> Result:
    """Median of every numeric figure over repeated runs (nested dicts too); other fields
    from the first run. ``runs`` keeps the individual values alongside."""
    if len(runs) == 1:
        return runs[0]
    merged: Result = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
            merged[key] = median_of(values)  # type: ignore[arg-type]
        elif (
            isinstance(first, int | float)
            and not isinstance(first, bool)
            and all(isinstance(v, int | float) for v in values)
        ):
            merged[key] = round(statistics.median(values), 3)  # type: ignore[type-var]
        else:
            merged[key] = first
    merged["repeats"] = len(runs)
    return merged


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(theirs: Any, ours: Any) -> str:
    if isinstance(theirs, int | float) and isinstance(ours, int | float) and ours:
        return f"{theirs / ours:.2f}x"
    return "-"


FANOUT_ROWS: list[tuple[str, str]] = [
    ("watchers connected", "connected"),
    ("connect + first state, s", "connect_seconds"),
    ("updates applied", "updates_applied"),
    ("delivered msgs/s", "delivered_per_s"),
    ("expected msgs/s", "expected_per_s"),
    ("lost (gaps + missing at end)", "lost"),
    ("out of order", "out_of_order"),
    ("latency p50, ms", "latency_ms.p50"),
    ("latency p90, ms", "latency_ms.p90"),
    ("latency p99, ms", "latency_ms.p99"),
    ("latency max, ms", "latency_ms.max"),
    ("publish call → receipt p50, ms", "publish_to_receipt_ms.p50"),
    ("publish call → receipt p99, ms", "publish_to_receipt_ms.p99"),
    ("server CPU-µs per delivered msg", "server_cpu_us_per_msg"),
    ("server CPU, share of one core", "server_cpu_share"),
    ("server RSS before, MB", "rss_before_kb"),
    ("server RSS per idle watcher, KB", "rss_kb_per_watcher"),
    ("redis-server CPU, s", "redis_cpu_s"),
    ("load generator CPU, s", "loadgen_cpu_s"),
    ("load generator CPU-µs per msg", "loadgen_cpu_us_per_msg"),
    ("publisher CPU, s", "publisher_cpu_s"),
]


def _get(result: Result | None, path: str) -> Any:
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    if path == "rss_before_kb" and isinstance(value, int | float):
        return value / 1024
    return value


def fanout_table(ours: Result, theirs: Result | None, floor: Result | None) -> str:
    head = (
        f"Fan-out: {ours['watchers']:,} watchers / {ours['jobs']:,} jobs / {ours['rate']:,.0f} updates/s "
        f"for {ours['seconds']:.0f} s ({ours['transport']}, publisher: {ours['publisher']}, "
        f"engine {ours['system']})"
    )
    lines = [
        f"### {head}",
        "",
        "| metric | Phasecast | python-socketio | ratio (theirs/ours) | Redis PUBLISH floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, path in FANOUT_ROWS:
        mine, other, base = _get(ours, path), _get(theirs, path), _get(floor, path)
        lines.append(f"| {label} | {_fmt(mine)} | {_fmt(other)} | {_ratio(other, mine)} | {_fmt(base)} |")
    return "\n".join(lines)


def plain_table(title: str, rows: list[Result], columns: list[tuple[str, str]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(label for label, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(_get(row, path)) for _, path in columns) + " |")
    return "\n".join(lines)


INGEST_COLUMNS = [
    ("engine", "system"),
    ("write path", "mode"),
    ("concurrency", "concurrency"),
    ("accepted updates/s", "accepted_per_s"),
    ("server CPU-µs per update", "server_cpu_us_per_update"),
    ("redis CPU, s", "redis_cpu_s"),
    ("publisher CPU, s", "publisher_cpu_s"),
    ("publisher CPU-µs per update", "publisher_cpu_us_per_update"),
    ("errors", "errors"),
]
FANOUT_COLUMNS = [
    ("system", "system"),
    ("transport", "transport"),
    ("publisher", "publisher"),
    ("watchers", "connected"),
    ("delivered/s", "delivered_per_s"),
    ("expected/s", "expected_per_s"),
    ("lost", "lost"),
    ("p50 ms", "latency_ms.p50"),
    ("p99 ms", "latency_ms.p99"),
    ("max ms", "latency_ms.max"),
    ("server CPU-µs/msg", "server_cpu_us_per_msg"),
    ("RSS KB/watcher", "rss_kb_per_watcher"),
    ("loadgen CPU s", "loadgen_cpu_s"),
]
STORM_COLUMNS = [
    ("engine", "system"),
    ("watchers", "watchers"),
    ("resynced", "resynced"),
    ("s from restart", "seconds_from_restart"),
    ("s from ready", "seconds_from_ready"),
    ("server start s", "server_start_seconds"),
    ("out of order", "out_of_order"),
]


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, figure, met / not met / not measured) for each target of issue 5."""
    verdicts: list[tuple[str, str, str]] = []

    def check(
        name: str, value: float | None, limit: float, higher_is_better: bool = False, note: str = ""
    ) -> None:
        if value is None:
            verdicts.append((name, "not measured", "not measured"))
            return
        ok = value >= limit if higher_is_better else value <= limit
        verdicts.append((name, f"{value:,.2f}{note}", "met" if ok else "not met"))

    head = results.get("fanout", {})
    ours, theirs = head.get("phasecast-redis"), head.get("socketio")
    scale = f" at {ours['connected']:,} watchers" if ours else ""
    check("≤ 20 CPU-µs per delivered WS message", _get(ours, "server_cpu_us_per_msg"), 20, note=scale)
    if ours and theirs and _get(ours, "server_cpu_us_per_msg") and _get(theirs, "server_cpu_us_per_msg"):
        check(
            "≥ 4x fewer CPU-µs than python-socketio",
            _get(theirs, "server_cpu_us_per_msg") / _get(ours, "server_cpu_us_per_msg"),
            4,
            True,
            "x",
        )
    else:
        check("≥ 4x fewer CPU-µs than python-socketio", None, 4)
    check("latency p50 ≤ 2 ms", _get(ours, "latency_ms.p50"), 2)
    check("latency p99 ≤ 25 ms", _get(ours, "latency_ms.p99"), 25)
    check("no losses", _get(ours, "lost"), 0)
    transports = results.get("transports", {})
    check("SSE ≤ 30 CPU-µs per delivered message", _get(transports.get("sse"), "server_cpu_us_per_msg"), 30)
    check("≤ 25 KB RSS per idle WS watcher", _get(ours, "rss_kb_per_watcher"), 25, note=scale)
    check("≤ 30 KB RSS per idle SSE watcher", _get(transports.get("sse"), "rss_kb_per_watcher"), 30)
    ingest = results.get("ingest", {})
    check(
        "ingest ≥ 5,000/s on Redis (HTTP)",
        _get(ingest.get("phasecast-redis/http"), "accepted_per_s"),
        5000,
        True,
    )
    check(
        "ingest ≥ 2,000/s on SQLite (HTTP)",
        _get(ingest.get("phasecast-sqlite/http"), "accepted_per_s"),
        2000,
        True,
    )
    storm = results.get("storm", {}).get("phasecast-redis")
    check(
        "reconnect storm resynced ≤ 10 s" + (f" ({storm['watchers']:,} watchers)" if storm else ""),
        _get(storm, "seconds_from_restart"),
        10,
    )
    return verdicts


def markdown(results: dict[str, Any]) -> str:
    parts: list[str] = []
    head = results.get("fanout", {})
    if "phasecast-redis" in head:
        parts.append(fanout_table(head["phasecast-redis"], head.get("socketio"), head.get("redis-floor")))
    extra = results.get("fanout_other", [])
    if extra:
        parts.append(plain_table("Other fan-out runs", extra, FANOUT_COLUMNS))
    transports = results.get("transports", {})
    if transports:
        parts.append(
            plain_table("SSE vs WebSocket (same workload)", list(transports.values()), FANOUT_COLUMNS)
        )
    ingest = results.get("ingest", {})
    if ingest:
        parts.append(
            plain_table(
                "Ingest (accepted updates/s, one server process)", list(ingest.values()), INGEST_COLUMNS
            )
        )
    storm = results.get("storm", {})
    if storm:
        parts.append(
            plain_table(
                "Reconnect storm (SIGKILL, change every job, restart)", list(storm.values()), STORM_COLUMNS
            )
        )
    verdicts = targets(results)
    lines = ["### Targets", "", "| target | figure | verdict |", "|---|---:|---|"]
    lines += [f"| {name} | {figure} | {verdict} |" for name, figure, verdict in verdicts]
    parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def draw_charts(folder: Path) -> list[Path]:
    """Latency and CPU-per-message charts of every fan-out result in ``folder`` (bench/charts.py),
    written beside them; skipped with a note when matplotlib is not installed."""
    try:
        from bench import charts
    except ImportError as exc:  # matplotlib is imported lazily; this guards the module itself
        print(f"charts skipped: {exc}", file=sys.stderr)
        return []
    try:
        documents = charts.load(folder)
        return charts.draw(charts.points(documents), folder, note=charts.describe(documents))
    except ImportError:
        print("charts skipped: install matplotlib (pip install -e '.[dev]')", file=sys.stderr)
        return []
