"""``python -m bench [scenario] [options]``; with no scenario, ``all`` (the suite)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report, scenarios, systems
from bench.common import loadavg, raise_nofile

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    versions = {}
    for name in ("uvicorn", "websockets", "starlette", "fastapi", "python-socketio", "redis", "uvloop"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "packages": versions,
        "redis": redis_version,
    }


def repeated(times: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    runs = [run() for _ in range(times)]
    merged = report.median_of(runs)
    if times > 1:
        merged["runs"] = runs
    return merged


def interleaved(times: int, runs: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each configuration ``times`` times, taking turns (A B C A B C ...), so a change in the
    machine's load hits every system alike; figures are medians per configuration."""
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(times):
        for name, run in runs.items():
            found[name].append(run())
    merged = {}
    for name, results in found.items():
        merged[name] = report.median_of(results)
        if times > 1:
            merged[name]["runs"] = results
    return merged


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _workers(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in str(getattr(args, "workers", "1")).split(",")]


def runs_for_sources(
    key: str, baseline: str | None, run_one: Callable[[str], dict[str, Any]]
) -> dict[str, Callable[[], dict[str, Any]]]:
    """One configuration's runs for ``interleaved``, A/B: ``key`` with the server of this
    checkout (or of ``--server-src``) and, given ``baseline`` (``--baseline-src``), also
    ``key@baseline`` with the server of that ``src/``, taking turns in one invocation.

    For its duration a run points ``systems.SERVER_ENV["PYTHONPATH"]`` at its source (the
    server and a tracker publisher import Phasecast from there), calls ``run_one(name)`` (the
    run's key, for the log) and records the source in the result (``server_src``; ``None``:
    this checkout)."""
    sources: dict[str, str | None] = {key: systems.SERVER_ENV.get("PYTHONPATH")}
    if baseline:
        sources[f"{key}@baseline"] = str(Path(baseline).resolve())
    runs: dict[str, Callable[[], dict[str, Any]]] = {}
    for name, source in sources.items():

        def run(name: str = name, source: str | None = source) -> dict[str, Any]:
            before = systems.SERVER_ENV.get("PYTHONPATH")
            _server_src(source)
            try:
                result = run_one(name)
            finally:
                _server_src(before)
            result["server_src"] = source
            return result

        runs[name] = run
    return runs


def _server_src(source: str | None) -> None:
    if source is None:
        systems.SERVER_ENV.pop("PYTHONPATH", None)
    else:
        systems.SERVER_ENV["PYTHONPATH"] = source


def run_fanout(args: argparse.Namespace, results: dict[str, Any]) -> None:
    systems = {
        # Phasecast, its peer, the raw-socket floor (same work at the socket floor) and the
        # Redis floor (no server at all), in one invocation.
        "compare": ["phasecast-redis", "socketio", "raw-floor", "redis-floor"],
        # Phasecast next to the raw-socket floor only: quick iterations on the delivery path.
        "floor": ["phasecast-redis", "raw-floor"],
        # A Redis Cluster of three shards next to a single Redis, in one invocation.
        "cluster": ["phasecast-redis", "phasecast-cluster"],
    }.get(args.system, [args.system])
    baseline = getattr(args, "baseline_src", None)
    runs: dict[str, Callable[[], dict[str, Any]]] = {}
    for name in systems:
        for workers in _workers(args) if name.startswith("phasecast") else [1]:

            def run(key: str, name: str = name, workers: int = workers) -> dict[str, Any]:
                _log(
                    f"fanout {key} (workers {workers}): {args.watchers} watchers, {args.jobs} jobs, "
                    f"{args.rate}/s, {args.seconds}s; load {loadavg()}"
                )
                result = scenarios.fanout(
                    name,
                    watchers=args.watchers,
                    jobs=args.jobs,
                    rate=args.rate,
                    seconds=args.seconds,
                    transport=args.transport,
                    publisher=args.publisher,
                    loadgen_procs=args.loadgen_procs,
                    profile=getattr(args, "profile", None),
                    workers=workers,
                    sources=getattr(args, "sources", 1),
                )
                _summary(result)
                return result

            key = name if workers == 1 else f"{name}/w{workers}"
            # --baseline-src: every Phasecast configuration also from that checkout.
            runs.update(runs_for_sources(key, baseline if name.startswith("phasecast") else None, run))
    for key, result in interleaved(args.repeat, runs).items():
        headline = result["transport"] in ("ws", "sio", "redis") and result["publisher"] in (
            "tracker",
            "sio",
            "redis",
        )
        if (
            headline
            and result["workers"] == 1
            and result["system"] != "phasecast-sqlite"
            and not key.endswith("@baseline")
        ):
            results.setdefault("fanout", {})[key] = result
        else:
            results.setdefault("fanout_other", []).append(result)


def run_transports(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """WebSocket, per-job SSE and multiplexed SSE (10 jobs per stream) on the same workload,
    taking turns."""
    runs: dict[str, Callable[[], dict[str, Any]]] = {}
    for transport in getattr(args, "transports", "ws,sse,ssemux").split(","):

        def run(key: str, t: str = transport) -> dict[str, Any]:
            _log(f"transports {key}: {args.watchers} watchers, {args.jobs} jobs, {args.rate}/s; load {loadavg()}")
            result = scenarios.fanout(
                "phasecast-redis",
                watchers=args.watchers,
                jobs=args.jobs,
                rate=args.rate,
                seconds=args.seconds,
                transport=t,
                publisher="tracker",
                loadgen_procs=args.loadgen_procs,
            )
            _summary(result)
            return result

        # --baseline-src: every transport also against that checkout's server, taking turns.
        runs.update(runs_for_sources(transport, getattr(args, "baseline_src", None), run))
    results.setdefault("transports", {}).update(interleaved(args.repeat, runs))


def run_ingest(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Phasecast on each engine and mode, with the floor servers (``bench/ingest_floor.py``:
    the same HTTP work with nothing else, on Redis) in the same interleaved invocation."""
    engines = ["redis", "sqlite"] if args.engine == "both" else [args.engine]
    modes = ["http", "batch", "tracker"] if args.mode == "all" else [args.mode]
    floors = [f"floor-{kind}" for kind in str(getattr(args, "floor", "raw,rawpipe,asgi")).split(",")
              if kind and kind != "none"]
    systems = [f"phasecast-{engine}" for engine in engines] + floors
    baseline = getattr(args, "baseline_src", None)
    if baseline:
        # Another checkout's server (``--baseline-src``) in the same invocation, taking turns.
        systems += [f"phasecast-{engine}@baseline" for engine in engines]
    runs: dict[str, Callable[[], dict[str, Any]]] = {}
    for name in systems:
        for mode in modes:
            if name.startswith("floor") and mode == "tracker":
                continue
            engine = name.removeprefix("phasecast-").removesuffix("@baseline")
            env = {"PYTHONPATH": str(Path(baseline).resolve())} if baseline and name.endswith("@baseline") else None
            for workers in _workers(args) if engine == "redis" and mode != "tracker" else [1]:
                # Batching pays off only with many reports in flight at once; one job per
                # writer, so writers never contend for a job.
                concurrency = args.concurrency * 8 if mode == "batch" else args.concurrency
                key = f"{name}/{mode}" + (f"/w{workers}" if workers > 1 else "")
                http = _load_shape(args, mode)

                def run(
                    n: str = name, m: str = mode, c: int = concurrency, w: int = workers,
                    h: dict[str, Any] | None = http, e: dict[str, str] | None = env,
                ) -> dict[str, Any]:
                    _log(f"ingest {n}/{m} (workers {w}): {args.seconds}s, concurrency {c} {h or ''}; load {loadavg()}")
                    result = scenarios.ingest(
                        n.removesuffix("@baseline"),
                        mode=m,
                        seconds=args.seconds,
                        jobs=max(64, c),
                        concurrency=c,
                        profile=getattr(args, "profile", None),
                        workers=w,
                        http=h,
                        env=e,
                    )
                    if e:
                        result["system"] = n
                        result["server_src"] = e["PYTHONPATH"]
                    _log(
                        f"  {result['accepted_per_s']:,.0f} accepted/s, "
                        f"{result['server_cpu_us_per_update']} server CPU-µs each, "
                        f"publisher {result['publisher_cpu_us_per_update']} CPU-µs each, errors {result['errors']}"
                    )
                    return result

                runs[key] = run
    results.setdefault("ingest", {}).update(interleaved(args.repeat, runs))


def _load_shape(args: argparse.Namespace, mode: str) -> dict[str, Any] | None:
    """The HTTP load generator's connections, pipelining window and batch size."""
    if mode == "tracker":
        return None
    window = getattr(args, "window", 2)
    if mode == "batch":
        return {"connections": getattr(args, "batch_connections", 2), "window": window,
                "batch_size": getattr(args, "batch_size", 100)}
    return {"connections": max(1, args.concurrency // window), "window": window}


def run_storm(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``--baseline-src DIR``: the same storm against the server from another checkout's
    ``src`` too, taking turns (A B A B ...), so both see the same machine."""
    engines = ["redis", "sqlite"] if args.engine == "both" else [args.engine]
    for engine in engines:

        def run(key: str, e: str = engine) -> dict[str, Any]:
            _log(f"storm {key}: {args.watchers} watchers over {args.jobs} jobs; load {loadavg()}")
            result = scenarios.storm(
                f"phasecast-{e}",
                watchers=args.watchers,
                jobs=args.jobs,
                loadgen_procs=args.loadgen_procs,
                profile=getattr(args, "profile", None),
                workers=getattr(args, "workers", 1),
            )
            _log(
                f"  resynced {result['resynced']:,} {result['seconds_from_ready']} s after ready "
                f"({result['seconds_from_listening']} s after listening), "
                f"{result['server_cpu_us_per_reconnect']} server CPU-µs per watcher "
                f"({result['server_cpu_us_per_reconnect_from_listening']} from listening), "
                f"{result['listen_drops']} listen drops"
            )
            return result

        runs = runs_for_sources(f"phasecast-{engine}", getattr(args, "baseline_src", None), run)
        results.setdefault("storm", {}).update(interleaved(args.repeat, runs))


def run_all(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The suite, sized for a few minutes on 2 cores (``--watchers`` etc. scale the head run)."""
    base = dict(repeat=args.repeat, loadgen_procs=args.loadgen_procs)
    run_fanout(
        argparse.Namespace(
            **base,
            system="compare",
            watchers=args.watchers,
            jobs=args.jobs,
            rate=args.rate,
            seconds=args.seconds,
            transport="ws",
            publisher="tracker",
        ),
        results,
    )
    small = max(100, args.watchers // 5)
    run_transports(
        argparse.Namespace(
            **base,
            watchers=small,
            jobs=max(10, args.jobs // 5),
            rate=max(10, args.rate / 5),
            seconds=args.seconds,
        ),
        results,
    )
    run_fanout(
        argparse.Namespace(
            **base,
            system="phasecast-sqlite",
            watchers=small,
            jobs=max(10, args.jobs // 5),
            rate=max(10, args.rate / 5),
            seconds=args.seconds,
            transport="ws",
            publisher="http",
        ),
        results,
    )
    run_ingest(
        argparse.Namespace(
            repeat=args.repeat, engine="both", mode="all", seconds=args.ingest_seconds, concurrency=32
        ),
        results,
    )
    run_storm(
        argparse.Namespace(
            **base, engine="redis", watchers=args.storm_watchers, jobs=max(10, args.storm_watchers // 10)
        ),
        results,
    )


def _summary(result: dict[str, Any]) -> None:
    lat = result["latency_ms"]
    _log(
        f"  {result['system']}/{result['transport']}: {result['connected']:,} watchers, "
        f"{result['delivered_per_s']:,.0f}/{result['expected_per_s']:,.0f} msgs/s, lost {result['lost']}, "
        f"p50 {lat['p50']} p99 {lat['p99']} ms, {result['server_cpu_us_per_msg']} CPU-µs/msg, "
        f"{result['rss_kb_per_watcher']} KB/watcher"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    top.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON and Markdown")
    top.add_argument("--repeat", type=int, default=1, help="runs per configuration; figures are medians")
    top.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes")
    top.add_argument("--server-src", help="run `phasecast serve` from this src/ directory (A/B runs)")
    sub = top.add_subparsers(dest="scenario")

    def sized(p: argparse.ArgumentParser, watchers: int, jobs: int, rate: float, seconds: float) -> None:
        p.add_argument("--watchers", type=int, default=watchers)
        p.add_argument("--jobs", type=int, default=jobs)
        p.add_argument("--rate", type=float, default=rate, help="updates/s over all jobs")
        p.add_argument("--seconds", type=float, default=seconds)

    everything = sub.add_parser("all", help="the whole suite (the default)")
    sized(everything, 5000, 500, 500, 10)
    everything.add_argument("--storm-watchers", type=int, default=10000)
    everything.add_argument("--ingest-seconds", type=float, default=6)

    fan = sub.add_parser("fanout", help="N watchers over M jobs at K updates/s")
    sized(fan, 10000, 1000, 1000, 20)
    fan.add_argument(
        "--system",
        default="compare",
        choices=[
            "compare", "floor", "cluster", "phasecast-redis", "phasecast-cluster", "phasecast-sqlite",
            "socketio", "raw-floor", "redis-floor",
        ],
    )
    fan.add_argument(
        "--workers", default="1", help="phasecast serve --workers; a list (1,2) runs each, taking turns"
    )
    fan.add_argument("--sources", type=int, default=1, help="client source addresses 127.0.0.2...")
    fan.add_argument("--transport", default="ws", choices=["ws", "sse", "ssemux"])
    fan.add_argument("--publisher", default="tracker", choices=["tracker", "http"])
    fan.add_argument("--profile", help="record the server with py-spy into this directory")
    fan.add_argument(
        "--baseline-src",
        help="also run each Phasecast configuration from this src/ directory, taking turns (A/B in one invocation)",
    )

    trans = sub.add_parser("transports", help="SSE vs WebSocket on the same workload")
    sized(trans, 2000, 200, 200, 10)
    trans.add_argument("--transports", default="ws,sse,ssemux", help="which, comma-separated")
    trans.add_argument(
        "--baseline-src", "--ab", dest="baseline_src", metavar="SRC",
        help="also run each transport against this checkout's src/, taking turns",
    )

    ing = sub.add_parser("ingest", help="accepted updates/s per server process")
    ing.add_argument("--engine", default="both", choices=["both", "redis", "sqlite"])
    ing.add_argument(
        "--mode",
        default="all",
        choices=["all", "http", "batch", "tracker"],
        help="http: one POST per report; batch: concurrent reports sent together to POST /v1/progress; tracker: in-process",
    )
    ing.add_argument("--seconds", type=float, default=8)
    ing.add_argument("--concurrency", type=int, default=32)
    ing.add_argument(
        "--workers", default="1", help="phasecast serve --workers (Redis, HTTP); a list (1,2) runs each"
    )
    ing.add_argument("--profile", help="record the server with py-spy into this directory")
    ing.add_argument(
        "--floor", default="raw,rawpipe,asgi",
        help="floor servers run beside Phasecast (bench/ingest_floor.py): any of raw, rawpipe, asgi "
        "(comma-separated), or none",
    )
    ing.add_argument("--baseline-src", help="also run `phasecast serve` from this src/ directory, taking turns")
    ing.add_argument("--window", type=int, default=2, help="pipelined requests in flight per connection")
    ing.add_argument("--batch-size", type=int, default=100, help="reports per POST /v1/progress")
    ing.add_argument("--batch-connections", type=int, default=2, help="connections in batch mode")

    st = sub.add_parser("storm", help="reconnect storm after a server restart")
    st.add_argument("--engine", default="redis", choices=["both", "redis", "sqlite"])
    st.add_argument("--watchers", type=int, default=10000)
    st.add_argument("--jobs", type=int, default=1000)
    st.add_argument("--profile", help="record the restarted server with py-spy into this directory")
    st.add_argument(
        "--workers", type=int, default=1,
        help="phasecast serve --workers N (Redis): the storm spread over N processes, all killed and restarted",
    )
    st.add_argument(
        "--baseline-src", "--compare-src", dest="baseline_src", metavar="SRC",
        help="also run the storm against the server from this src/ directory, taking turns",
    )
    return top


RUNNERS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], None]] = {
    "all": run_all,
    "fanout": run_fanout,
    "transports": run_transports,
    "ingest": run_ingest,
    "storm": run_storm,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in RUNNERS for a in argv):
        argv = [*(a for a in argv), "all"] if not argv else _insert_all(argv)
    args = parser().parse_args(argv)
    raise_nofile()
    if args.server_src:
        systems.SERVER_ENV["PYTHONPATH"] = str(Path(args.server_src).resolve())
    started = time.time()
    results: dict[str, Any] = {}
    RUNNERS[args.scenario](args, results)
    table = report.markdown(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "scenario": args.scenario,
        "argv": argv,
        "started": started,
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "results": results,
        "targets": [{"target": n, "figure": f, "verdict": v} for n, f, v in report.targets(results)],
    }
    json_path = args.out / f"{stamp}-{args.scenario}.json"
    json_path.write_text(json.dumps(document, indent=2))
    (args.out / f"{stamp}-{args.scenario}.md").write_text(table)
    print(table)
    _log(f"results: {json_path} ({document['duration_s']} s)")
    for chart in report.draw_charts(args.out):
        _log(f"chart: {chart}")


def _insert_all(argv: list[str]) -> list[str]:
    """Global options only (``python -m bench --repeat 3``): run the suite."""
    return [*argv, "all"]
