"""Charts of fan-out results: delivery latency percentiles and server CPU per delivered
message against the number of watchers, one line per system (Phasecast, python-socketio,
the Redis floor, and whatever other systems the results hold).

Drawn from every result document in a folder, so runs at different watcher counts add up to
one curve per system; repeated points (same system, transport, publisher and watcher count)
are reduced to their median.

    python -m bench.charts [RESULTS_DIR] [--out DIR]

``python -m bench`` calls ``draw`` after each run (through ``report.draw_charts``). Needs
matplotlib (in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LATENCY_CHART = "fanout-latency.svg"
CPU_CHART = "fanout-cpu.svg"

# Friendly names for the systems the harness knows; any other system keeps its own name.
LABELS = {
    "phasecast-redis": "Phasecast (Redis)",
    "phasecast-sqlite": "Phasecast (SQLite)",
    "socketio": "python-socketio",
    "redis-floor": "Redis PUBLISH floor (1 subscriber per job)",
    "raw-floor": "raw-socket floor (uvloop, pre-encoded frames)",
}


@dataclass(frozen=True, slots=True)
class Point:
    series: str
    watchers: int
    p50: float
    p90: float
    p99: float
    cpu_us_per_msg: float | None


def series_name(result: dict[str, Any]) -> str:
    """One line per system; a transport or publisher other than the headline one is named."""
    name = LABELS.get(result["system"], str(result["system"]))
    extras = []
    if result.get("transport") not in (None, "ws", "sio", "redis"):
        extras.append(str(result["transport"]).upper())
    if result.get("publisher") == "http":
        extras.append("HTTP publisher")
    return f"{name}, {', '.join(extras)}" if extras else name


def fanout_results(document: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Every fan-out result in a ``python -m bench`` result document."""
    results = document.get("results", {})
    yield from results.get("fanout", {}).values()
    yield from results.get("fanout_other", [])
    yield from results.get("transports", {}).values()


def points(documents: Iterable[dict[str, Any]]) -> list[Point]:
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for document in documents:
        for result in fanout_results(document):
            latency = result.get("latency_ms") or {}
            if not {"p50", "p90", "p99"} <= latency.keys() or not result.get("watchers"):
                continue
            if any(latency[q] is None for q in ("p50", "p90", "p99")):  # nothing delivered
                continue
            grouped.setdefault((series_name(result), int(result["watchers"])), []).append(result)
    found = []
    for (series, watchers), runs in sorted(grouped.items()):
        cpu = [r["server_cpu_us_per_msg"] for r in runs if isinstance(r.get("server_cpu_us_per_msg"), int | float)]
        found.append(
            Point(
                series=series,
                watchers=watchers,
                p50=statistics.median(r["latency_ms"]["p50"] for r in runs),
                p90=statistics.median(r["latency_ms"]["p90"] for r in runs),
                p99=statistics.median(r["latency_ms"]["p99"] for r in runs),
                cpu_us_per_msg=statistics.median(cpu) if cpu else None,
            )
        )
    return found


def describe(documents: list[dict[str, Any]]) -> str:
    """A line under each chart: how many runs, which commits, the machine's load around them
    (the machine is shared; latency moves with its load)."""
    loads = [
        r["machine_load_1m_before"]
        for d in documents
        for r in fanout_results(d)
        if isinstance(r.get("machine_load_1m_before"), int | float)
    ]
    commits = sorted({str(d.get("machine", {}).get("commit")) for d in documents if d.get("machine")})
    cores = next((d["machine"].get("cores") for d in documents if d.get("machine")), None)
    parts = [f"{len(documents)} run{'s' if len(documents) != 1 else ''}"]
    if commits:
        parts.append("commit " + ", ".join(commits))
    if cores:
        parts.append(f"{cores} cores")
    if loads:
        parts.append(f"1-min load average before each run {min(loads):.1f} to {max(loads):.1f}")
    return "; ".join(parts)


def load(folder: Path) -> list[dict[str, Any]]:
    documents = []
    for path in sorted(folder.glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and "results" in document:
            documents.append(document)
    return documents


def _series(found: list[Point]) -> dict[str, list[Point]]:
    by_series: dict[str, list[Point]] = {}
    for point in found:
        by_series.setdefault(point.series, []).append(point)
    return by_series


def draw(found: list[Point], out: Path, *, note: str = "") -> list[Path]:
    """Write the latency and CPU charts as SVG into ``out``; returns the files written (none
    when there is nothing to draw)."""
    if not found:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Reproducible SVG: no timestamp, stable element ids, text kept as text.
    plt.rcParams.update({"svg.hashsalt": "phasecast", "svg.fonttype": "none", "font.size": 10})
    metadata = {"Date": None, "Creator": "python -m bench.charts"}
    out.mkdir(parents=True, exist_ok=True)
    by_series = _series(found)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    watcher_counts = sorted({p.watchers for p in found})
    written = []

    figure, axes = plt.subplots(figsize=(8, 4.8))
    for index, (series, pts) in enumerate(sorted(by_series.items())):
        color = colors[index % len(colors)]
        xs = [p.watchers for p in pts]
        axes.plot(xs, [p.p50 for p in pts], marker="o", color=color, label=f"{series} p50")
        axes.plot(xs, [p.p99 for p in pts], marker="^", linestyle="--", color=color, label=f"{series} p99")
    axes.set_yscale("log")
    _watchers_axis(axes, watcher_counts)
    axes.set_ylabel("delivery latency, ms (log scale)")
    axes.set_title("Fan-out latency: change accepted → watcher read it")
    _finish(figure, axes, note)
    path = out / LATENCY_CHART
    figure.savefig(path, format="svg", metadata=metadata)
    plt.close(figure)
    written.append(path)

    with_cpu = {s: [p for p in pts if p.cpu_us_per_msg is not None] for s, pts in by_series.items()}
    with_cpu = {s: pts for s, pts in with_cpu.items() if pts}
    if with_cpu:
        figure, axes = plt.subplots(figsize=(8, 4.8))
        for series, pts in sorted(with_cpu.items()):
            axes.plot(
                [p.watchers for p in pts],
                [p.cpu_us_per_msg for p in pts],
                marker="o",
                color=colors[sorted(by_series).index(series) % len(colors)],
                label=series,
            )
        axes.set_ylim(bottom=0)
        _watchers_axis(axes, watcher_counts)
        axes.set_ylabel("server CPU-µs per delivered message")
        axes.set_title("Server CPU per delivered message (lower is better)")
        _finish(figure, axes, note)
        path = out / CPU_CHART
        figure.savefig(path, format="svg", metadata=metadata)
        plt.close(figure)
        written.append(path)
    return written


def _watchers_axis(axes: Any, counts: list[int]) -> None:
    if len(counts) > 1 and counts[-1] / max(1, counts[0]) >= 8:
        axes.set_xscale("log")
    axes.set_xticks(counts, [f"{c:,}" for c in counts])
    axes.minorticks_off()
    axes.set_xlabel("watchers (WebSocket connections; SSE where named)")
    axes.grid(True, which="major", alpha=0.3)


def _finish(figure: Any, axes: Any, note: str) -> None:
    axes.legend(fontsize=8, loc="best")
    if note:
        figure.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    figure.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))


def main(argv: list[str] | None = None) -> None:
    from bench.cli import RESULTS_DIR

    parser = argparse.ArgumentParser(prog="python -m bench.charts", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR, help="folder of result JSON")
    parser.add_argument("--out", type=Path, help="where to write the SVGs (default: the results folder)")
    parser.add_argument("--note", default="", help="the line under each chart (default: runs, commits, load)")
    args = parser.parse_args(argv)
    documents = load(args.results)
    written = draw(points(documents), args.out or args.results, note=args.note or describe(documents))
    if not written:
        raise SystemExit(f"no fan-out results in {args.results}; run `python -m bench fanout` first")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
