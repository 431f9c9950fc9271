"""The scenarios: each starts its systems, drives them, and returns a flat dict of figures."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    cpu_split,
    descendants,
    loadavg,
    merge_histograms,
    percentiles,
    rss_kb,
    token,
)
from bench.control import Child, child_argv
from bench.systems import (
    SERVER_ENV,
    System,
    create_jobs,
    phasecast,
    private_redis,
    raw_floor_server,
    redis_cluster,
    redis_floor,
    socketio_server,
)

IDLE_SETTLE_SECONDS = 2.0
DRAIN_SECONDS = 1.5


@contextlib.contextmanager
def system_for(name: str, env: dict[str, str] | None = None, workers: int = 1) -> Iterator[System]:
    """``phasecast-redis``, ``phasecast-cluster``, ``phasecast-sqlite``, ``socketio``,
    ``raw-floor`` or ``redis-floor``, each on a private redis-server of its own (so Redis CPU
    is measurable and nothing is shared)."""
    with private_redis() as redis:
        if name == "phasecast-redis":
            with phasecast("redis", redis, env, workers=workers) as system:
                yield system
        elif name == "phasecast-cluster":
            with redis_cluster() as cluster, phasecast("redis", redis, env, cluster, workers) as system:
                yield system
        elif name == "phasecast-sqlite":
            with phasecast("sqlite", None, env) as system:
                yield system
        elif name == "socketio":
            with socketio_server(redis) as system:
                yield system
        elif name == "raw-floor":
            with raw_floor_server(redis) as system:
                yield system
        elif name == "redis-floor":
            yield redis_floor(redis)
        elif name in ("floor-asgi", "floor-raw", "floor-rawpipe"):
            from bench import ingest_floor

            with ingest_floor.system(name, redis) as system:
                yield system
        else:
            raise ValueError(f"unknown system {name!r}")


def _loadgens(
    system: System, transport: str, watchers: int, procs: int, reconnect: bool = False, sources: int = 1
) -> list[Child]:
    viewer = token(["jobs:read"])
    children = []
    share = -(-watchers // procs)
    for k in range(procs):
        count = min(share, watchers - k * share)
        if count <= 0:
            break
        config = {
            "transport": transport,
            "port": system.port,
            "token": viewer,
            "jobs": system.jobs,
            "watchers": count,
            "offset": k * share,
            "reconnect": reconnect,
            "redis_url": system.redis_url,
            "channel": system.channel,
            # Source addresses 127.0.0.2, 127.0.0.3, ... (``sources`` of them, round robin over
            # the watchers): more than one address's worth of ephemeral ports.
            "source_addresses": [f"127.0.0.{2 + j}" for j in range(sources)] if sources > 1 else [],
        }
        children.append(Child(child_argv("bench.loadgen", config), f"loadgen{k}"))
    return children


def _publisher(
    system: System,
    mode: str,
    jobs: list[str],
    rate: float | None,
    seconds: float,
    concurrency: int,
    env: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Child:
    config = {
        "mode": mode,
        "port": system.port,
        "token": token(["jobs:write"], sub="bench-worker"),
        "engine": system.engine_url,
        "redis_url": system.redis_url,
        "channel": system.channel,
        "jobs": jobs,
        "rate": rate,
        "seconds": seconds,
        "concurrency": concurrency,
        **(extra or {}),
    }
    # ``--server-src``: an in-process tracker writes with that checkout's engine (key layout,
    # pub/sub codec), as the server under test expects.
    server_src = (env or {}).get("PYTHONPATH") or SERVER_ENV.get("PYTHONPATH")
    source = server_src if mode == "tracker" and system.kind == "phasecast" else None
    return Child(child_argv("bench.publisher", config), "publisher", source)


def listen_drops() -> int:
    """The kernel's ``TcpExt: ListenDrops`` (it includes ``ListenOverflows``): SYNs and
    completed connections dropped at a full listen queue, machine-wide."""
    with open("/proc/net/netstat") as handle:
        rows = [line.split() for line in handle if line.startswith("TcpExt:")]
    names, values = rows[0], rows[1]
    return int(values[names.index("ListenDrops")])


def _profile(pid: int, seconds: float, where: str | None) -> subprocess.Popen[bytes] | None:
    """py-spy on the server during the measured window (``--profile DIR``): collapsed
    stacks, to read where the time goes."""
    if not where:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(where) / f"server-{time.strftime('%H%M%S')}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            *(["--native"] if os.environ.get("BENCH_PROFILE_NATIVE") else []),
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _loadavg() -> float:
    """The machine's 1-minute load average: other work on a shared 2-core machine shows here."""
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def _server_latency(system: System) -> dict[str, float] | None:
    """Phasecast's own view (``/metrics``: change → socket write), to tell server-side delay
    from delay in the network or the load generator."""
    if system.kind != "phasecast":
        return None
    import httpx

    text = httpx.get(f"http://127.0.0.1:{system.port}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith('phasecast_delivery_latency_seconds_sum{transport="'):
            total += float(line.split()[-1])
        elif line.startswith('phasecast_delivery_latency_seconds_count{transport="'):
            count += float(line.split()[-1])
    return {"mean": round(total / count * 1000, 3) if count else 0.0, "count": count}


def _watchers_per_job(jobs: list[str], watchers: int) -> Counter[str]:
    return Counter(jobs[i % len(jobs)] for i in range(watchers))


def fanout(
    system_name: str,
    *,
    watchers: int,
    jobs: int,
    rate: float,
    seconds: float,
    transport: str = "ws",
    publisher: str = "tracker",
    loadgen_procs: int = 1,
    concurrency: int = 64,
    profile: str | None = None,
    workers: int = 1,
    sources: int = 1,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """N watchers over M jobs, K updates/s for S seconds: latency, delivery, losses, CPU, RSS."""
    uptime_before = loadavg()
    if system_name == "socketio":
        transport, publisher = "sio", "sio"
    elif system_name == "raw-floor":
        transport, publisher = "ws", "redis"
    elif system_name == "redis-floor":
        transport, publisher, watchers = "redis", "redis", jobs
    with system_for(system_name, env, workers) as system:
        ids = create_jobs(system, jobs, uuid.uuid4().hex[:6])
        rss_before = rss_kb(system.pid)
        loadgens = _loadgens(system, transport, watchers, loadgen_procs, sources=sources)
        try:
            ready = [g.expect("ready", 60 + watchers / 50) for g in loadgens]
            time.sleep(IDLE_SETTLE_SECONDS)
            rss_after = rss_kb(system.pid)
            pub = _publisher(system, publisher, ids, rate, seconds, concurrency, env)
            try:
                pub.expect("ready", 30)
                pids = {"server": system.pid, **{g.name: g.pid for g in loadgens}}
                if system.redis_pid:
                    pids["redis"] = system.redis_pid
                meter = CpuMeter(pids)
                for g in loadgens:
                    g.send("measure")
                    g.expect("measuring", 10)
                load_before = _loadavg()
                meter.start()
                profiler = _profile(system.pid, seconds, profile)
                pub.send("go")
                published = pub.expect("result", seconds + 120)
                time.sleep(DRAIN_SECONDS)
                cpu = meter.stop()
                server_sys = meter.server_system()
                if profiler is not None:
                    profiler.wait(60)
            finally:
                pub.close()
            server_side = _server_latency(system)
            for g in loadgens:
                g.send("stop", seqs=published["seqs"])
            received = [g.expect("result", 60) for g in loadgens]
        finally:
            for g in loadgens:
                g.close()
    per_job = _watchers_per_job(ids, watchers)
    expected = sum(n * per_job[job] for job, n in published["applied_per_job"].items())
    delivered = sum(r["messages"] for r in received)
    gaps = sum(r["gaps"] for r in received)
    tail = sum(r["tail_missing"] for r in received)
    latency = percentiles(merge_histograms(r["latency_hist"] for r in received))
    e2e = percentiles(merge_histograms(r["e2e_hist"] for r in received))
    elapsed = published["elapsed"]
    loadgen_cpu = sum(cpu[g.name] for g in loadgens)
    return {
        "system": system_name,
        "transport": transport,
        "publisher": publisher,
        "watchers": watchers,
        "jobs": jobs,
        "rate": rate,
        "seconds": seconds,
        "workers": workers,
        "loadgen_procs": len(loadgens),
        "source_addresses": sources,
        "server_env": env or {},
        "uptime_before": uptime_before,
        "connected": sum(r["ready"] for r in ready),
        "connect_failures": sum(r["failed"] for r in ready),
        "connect_seconds": max(r["ready_seconds"] for r in ready),
        "connect_retries": sum(r.get("connect_retries", 0) for r in ready),
        "updates_applied": published["applied"],
        "publish_errors": published["errors"],
        "publisher_behind_max_in_flight": published["max_in_flight"],
        "publisher_write_ms": published.get("write_ms"),
        "expected_messages": expected,
        "delivered_messages": delivered,
        "delivered_per_s": round(delivered / elapsed, 1),
        "expected_per_s": round(expected / elapsed, 1),
        "lost": gaps + tail,
        "gaps": gaps,
        "tail_missing": tail,
        "out_of_order": sum(r["out_of_order"] for r in received),
        "watchers_behind_at_end": sum(r["watchers_behind"] for r in received),
        "watchers_open_at_end": sum(r["open"] for r in received),
        "ws_errors": dict(sum((Counter(r["errors"]) for r in received), Counter())),
        "latency_ms": latency,
        "publish_to_receipt_ms": e2e,
        "server_side_latency_ms": server_side,
        "machine_load_1m_before": load_before,
        "machine_load_1m_after": _loadavg(),
        "server_cpu_s": round(cpu["server"], 3),
        "server_cpu_system_s": round(server_sys, 3),
        "server_cpu_us_per_msg": round(cpu["server"] / delivered * 1e6, 2) if delivered else None,
        "server_cpu_share": round(cpu["server"] / (elapsed + DRAIN_SECONDS), 3),
        "redis_cpu_s": round(cpu.get("redis", 0.0), 3),
        "loadgen_cpu_s": round(loadgen_cpu, 3),
        "loadgen_cpu_us_per_msg": round(loadgen_cpu / delivered * 1e6, 2) if delivered else None,
        "publisher_cpu_s": published["cpu_seconds"],
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "rss_kb_per_watcher": round((rss_after - rss_before) / watchers, 2)
        if system_name != "redis-floor"
        else None,
        # ssemux: one stream carries 10 watchers (jobs); per stream is what a browser holds.
        "rss_kb_per_stream": round((rss_after - rss_before) / -(-watchers // 10), 2)
        if transport == "ssemux"
        else None,
    }


def ingest(
    system_name: str,
    *,
    mode: str = "http",
    seconds: float = 8.0,
    jobs: int = 64,
    concurrency: int = 32,
    profile: str | None = None,
    workers: int = 1,
    http: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Accepted updates/s, as fast as the server (or the in-process tracker) takes them.
    ``http``: the HTTP load generator's shape (``connections``, ``window``, ``batch_size``);
    ``env``: extra environment of the server (``PYTHONPATH`` of another checkout: A/B)."""
    uptime_before = loadavg()
    with system_for(system_name, env, workers=workers) as system:
        ids = create_jobs(system, jobs, uuid.uuid4().hex[:6])
        pub = _publisher(system, mode, ids, None, seconds, concurrency, env, extra=http)
        try:
            pub.expect("ready", 30)
            pids = {"server": system.pid}
            if system.redis_pid:
                pids["redis"] = system.redis_pid
            meter = CpuMeter(pids)
            meter.start()
            profiler = _profile(system.pid, seconds, profile)
            pub.send("go")
            published = pub.expect("result", seconds + 60)
            cpu = meter.stop()
            if profiler is not None:
                profiler.wait(60)
        finally:
            pub.close()
    applied = published["applied"]
    return {
        "system": system_name,
        "mode": mode,
        "workers": workers,
        "uptime_before": uptime_before,
        "seconds": seconds,
        "jobs": jobs,
        "concurrency": concurrency,
        **({"load": http} if http else {}),
        "applied": applied,
        "errors": published["errors"],
        "accepted_per_s": round(applied / published["elapsed"], 1),
        "server_cpu_s": round(cpu["server"], 3),
        "server_cpu_us_per_update": round(cpu["server"] / applied * 1e6, 1) if applied else None,
        "redis_cpu_s": round(cpu.get("redis", 0.0), 3),
        "publisher_cpu_s": published["cpu_seconds"],
        "publisher_cpu_us_per_update": round(published["cpu_seconds"] / applied * 1e6, 1)
        if applied
        else None,
    }


def storm(
    system_name: str,
    *,
    watchers: int,
    jobs: int,
    loadgen_procs: int = 1,
    profile: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Every watcher dropped at once (SIGKILL of the server, all its worker processes
    with it), each job changed while the server is down, server started again: seconds
    until every watcher has the new state."""
    uptime_before = loadavg()
    with system_for(system_name, workers=workers) as system:
        ids = create_jobs(system, jobs, uuid.uuid4().hex[:6])
        loadgens = _loadgens(system, "ws", watchers, loadgen_procs, reconnect=True)
        try:
            ready = [g.expect("ready", 60 + watchers / 50) for g in loadgens]
            assert system.server is not None
            # ``serve --workers N``: its workers die with it, as in a machine's crash.
            workers_before = descendants(system.pid)
            system.server.kill()
            for pid in workers_before:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            # One change per job while the server is away: resync must deliver it.
            pub = _publisher(system, "tracker", ids, len(ids) * 4.0, 0.25, 64)
            try:
                pub.expect("ready", 30)
                pub.send("go")
                published = pub.expect("result", 60)
            finally:
                pub.close()
            drops_before = listen_drops()
            spawned = time.time()
            listening = _Listening(system.port, system.server, profile)
            system.server.start(timeout=60)
            ready_at = time.time()
            system.pid = system.server.pid
            listening_at, cpu_at_listening, profiler = listening.result()
            # Server CPU from ready to the last watcher resynced: what the storm costs the
            # restarted process, apart from its start (a figure the machine's load moves less
            # than seconds do).
            tree = [system.pid, *descendants(system.pid)]
            cpu_at_ready = _tree_cpu(tree)
            if profiler is None:
                profiler = _profile(system.pid, 15, profile)
            for g in loadgens:
                g.send("expect", seqs=published["seqs"], timeout=120)
            synced = [g.expect("synced", 150) for g in loadgens]
            cpu_at_end = _tree_cpu(tree)
            user, kernel = (b - a for a, b in zip(cpu_at_ready, cpu_at_end, strict=True))
            storm_cpu = user + kernel
            from_listening = sum(cpu_at_end) - sum(cpu_at_listening) if cpu_at_listening else None
            drops = listen_drops() - drops_before
            if profiler is not None:
                profiler.wait(60)
            for g in loadgens:
                g.send("stop", seqs=published["seqs"])
            received = [g.expect("result", 60) for g in loadgens]
        finally:
            for g in loadgens:
                g.close()
    done = [s["at"] for s in synced]
    all_done = None if any(at is None for at in done) else max(done)
    return {
        "system": system_name,
        "workers": workers,
        "watchers": watchers,
        "jobs": jobs,
        "uptime_before": uptime_before,
        "connected": sum(r["ready"] for r in ready),
        "resynced": sum(s["synced"] for s in synced),
        "seconds_from_restart": round(all_done - spawned, 3) if all_done else None,
        "seconds_from_ready": round(all_done - ready_at, 3) if all_done else None,
        "server_start_seconds": round(ready_at - spawned, 3),
        # From the moment the restarted server listens (its start-up done: uvicorn binds
        # after the application's startup) rather than from its first /readyz answer, which
        # waits in the same accept queue as the storm and so comes late when the storm is big.
        "seconds_from_listening": round(all_done - listening_at, 3) if all_done and listening_at else None,
        "server_cpu_us_per_reconnect_from_listening": round(from_listening * 1e6 / max(1, watchers))
        if from_listening is not None
        else None,
        "server_cpu_seconds_after_ready": round(storm_cpu, 3),
        "server_cpu_us_per_reconnect": round(storm_cpu * 1e6 / max(1, watchers)),
        "server_kernel_share": round(kernel / storm_cpu, 2) if storm_cpu else None,
        # Connection attempts the kernel dropped because the accept queue was full (each
        # costs its client a SYN retransmit: 1 s, then 3 s ...). Machine-wide counters.
        "listen_drops": drops,
        "loadgen_cpu_seconds": round(sum(r["cpu_seconds"] for r in received), 3),
        "reconnects": sum(r["reconnects"] for r in received),
        "out_of_order": sum(r["out_of_order"] for r in received),
        "watchers_behind": sum(r["watchers_behind"] for r in received),
    }


class _Listening:
    """Watches, in a thread, for the restarted server's port to accept a connection (the
    kernel completes it from the listen queue, so the storm does not delay it), then takes
    the server's CPU at that moment (and starts the profiler, if one is asked for)."""

    def __init__(self, port: int, server: Any, profile: str | None = None) -> None:
        import threading

        self.port = port
        self.server = server  # a ServerProcess: its ``process`` is set once it is spawned
        self.at: float | None = None
        self.cpu: tuple[float, float] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None
        self._profile = profile
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import socket

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.005)
                continue
            self.at = time.time()
            process = self.server.process
            if process is not None:
                pid = process.pid
                self.cpu = _tree_cpu([pid, *descendants(pid)])
                self.profiler = _profile(pid, 15, self._profile)
            return

    def result(self) -> tuple[float | None, tuple[float, float] | None, subprocess.Popen[bytes] | None]:
        self._thread.join(60)
        return self.at, self.cpu, self.profiler


def _tree_cpu(pids: list[int]) -> tuple[float, float]:
    """User and kernel CPU seconds of these processes, added up."""
    user = kernel = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            u, k = cpu_split(pid)
            user += u
            kernel += k
    return user, kernel
