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
        elif key == "uptime_before":
            merged[key] = "; ".join(str(v) for v in values)  # the load before each run (one table cell)
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


def fanout_table(
    ours: Result, theirs: Result | None, floor: Result | None, raw_floor: Result | None = None
) -> str:
    head = (
        f"Fan-out: {ours['watchers']:,} watchers / {ours['jobs']:,} jobs / {ours['rate']:,.0f} updates/s "
        f"for {ours['seconds']:.0f} s ({ours['transport']}, publisher: {ours['publisher']}, "
        f"engine {ours['system']})"
    )
    loads = [
        f"{name} {r.get('uptime_before', '?')}"
        for name, r in (("Phasecast", ours), ("python-socketio", theirs), ("raw floor", raw_floor))
        if r is not None
    ]
    lines = [
        f"### {head}",
        "",
        f"Load (1/5/15 min) before each run: {'; '.join(loads)}.",
        "",
        "| metric | Phasecast | python-socketio | ratio (theirs/ours) | raw-socket floor "
        "| ratio (ours/floor) | Redis PUBLISH floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, path in FANOUT_ROWS:
        mine, other, raw, base = _get(ours, path), _get(theirs, path), _get(raw_floor, path), _get(floor, path)
        lines.append(
            f"| {label} | {_fmt(mine)} | {_fmt(other)} | {_ratio(other, mine)} | {_fmt(raw)} "
            f"| {_ratio(mine, raw)} | {_fmt(base)} |"
        )
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
    ("workers", "workers"),
    ("load before", "uptime_before"),
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
    ("workers", "workers"),
    ("load before", "uptime_before"),
    ("transport", "transport"),
    ("publisher", "publisher"),
    ("watchers", "connected"),
    ("delivered/s", "delivered_per_s"),
    ("expected/s", "expected_per_s"),
    ("lost", "lost"),
    ("p50 ms", "latency_ms.p50"),
    ("p99 ms", "latency_ms.p99"),
    ("max ms", "latency_ms.max"),
    ("out of order", "out_of_order"),
    ("server CPU-µs/msg", "server_cpu_us_per_msg"),
    ("RSS KB/watcher", "rss_kb_per_watcher"),
    ("RSS KB/stream", "rss_kb_per_stream"),
    ("loadgen CPU s", "loadgen_cpu_s"),
]
STORM_COLUMNS = [
    ("engine", "system"),
    ("workers", "workers"),
    ("load before", "uptime_before"),
    ("watchers", "watchers"),
    ("resynced", "resynced"),
    ("s from restart", "seconds_from_restart"),
    ("s from ready", "seconds_from_ready"),
    ("server start s", "server_start_seconds"),
    ("server CPU-µs per watcher after ready", "server_cpu_us_per_reconnect"),
    ("listen drops", "listen_drops"),
    ("out of order", "out_of_order"),
]


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, figure, met / not met / not measured) for each target of issue 9."""
    verdicts: list[tuple[str, str, str]] = []

    def check(
        name: str, value: float | None, limit: float, higher_is_better: bool = False, note: str = ""
    ) -> None:
        if value is None:
            verdicts.append((name, "not measured", "not measured"))
            return
        ok = value >= limit if higher_is_better else value <= limit
        verdicts.append((name, f"{value:,.2f}{note}", "met" if ok else "not met"))

    def ratio(a: Result | None, b: Result | None, path: str) -> float | None:
        x, y = _get(a, path), _get(b, path)
        return x / y if isinstance(x, int | float) and isinstance(y, int | float) and y else None

    head = results.get("fanout", {})
    ours, theirs, raw = head.get("phasecast-redis"), head.get("socketio"), head.get("raw-floor")
    scale = f" at {ours['connected']:,} watchers" if ours else ""
    cpu = "server_cpu_us_per_msg"
    check("WS CPU-µs per message ≤ 1.5x the raw-socket floor", ratio(ours, raw, cpu), 1.5, note="x" + scale)
    check("WS ≥ 5x fewer CPU-µs than python-socketio", ratio(theirs, ours, cpu), 5, True, "x")
    check("WS latency p99 ≤ 10 ms", _get(ours, "latency_ms.p99"), 10)
    check("WS lost = 0", _get(ours, "lost"), 0)
    check("WS out of order = 0", _get(ours, "out_of_order"), 0)
    transports = results.get("transports", {})
    ws, sse, mux = transports.get("ws"), transports.get("sse"), transports.get("ssemux")
    check("SSE CPU-µs per message ≤ 1.25x WebSocket (same run)", ratio(sse, ws, cpu), 1.25, note="x")
    check("multiplexed SSE ≤ per-job SSE CPU-µs per message", ratio(mux, sse, cpu), 1.0, note="x")
    check("≤ 10 KB RSS per idle WS watcher", _get(ours, "rss_kb_per_watcher"), 10, note=scale)
    check("≤ 10 KB RSS per idle SSE stream (per job)", _get(sse, "rss_kb_per_watcher"), 10)
    check("≤ 10 KB RSS per idle multiplexed SSE stream", _get(mux, "rss_kb_per_stream"), 10)
    storm = results.get("storm", {}).get("phasecast-redis")
    check(
        "reconnect storm resynced ≤ 3 s after ready" + (f" ({storm['watchers']:,} watchers)" if storm else ""),
        _get(storm, "seconds_from_ready"),
        3,
    )
    return verdicts


def markdown(results: dict[str, Any]) -> str:
    parts: list[str] = []
    head = results.get("fanout", {})
    if "phasecast-redis" in head:
        parts.append(
            fanout_table(
                head["phasecast-redis"], head.get("socketio"), head.get("redis-floor"), head.get("raw-floor")
            )
        )
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
