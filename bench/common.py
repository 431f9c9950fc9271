"""Small shared pieces: /proc readings, the latency histogram, tokens, timestamps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tests.support.process import TEST_SECRET

from phasecast.config import Settings
from phasecast.server.auth import mint_token

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Latencies are kept as counts per 10 µs bucket: small to ship between processes, exact
# enough for percentiles in the millisecond range.
BUCKET_US = 10
VIEWER = "bench-viewer"


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard limit (10,000 sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def stop_process(process: subprocess.Popen[Any], grace: float = 10) -> None:
    """Stop a server process started by the bench: SIGTERM, then SIGKILL if it has not
    exited within ``grace`` seconds; reaped either way, so no zombie outlives the run."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace)


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # After the ")" the fields start at #3 (state); utime and stime are #14 and #15.
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far."""
    return sum(cpu_split(pid))


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its descendants (``serve --workers N`` forks N)."""
    total = 0
    for one in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{one}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def loadavg() -> str:
    """``uptime``'s load averages (1, 5, 15 minutes): other work on the shared machine."""
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


@dataclass(slots=True)
class CpuMeter:
    """CPU used by a set of processes between ``start`` and ``stop``."""

    pids: dict[str, int]
    _start: dict[str, float] | None = None
    _system: float = 0.0
    used: dict[str, float] | None = None

    def start(self) -> None:
        # A server with worker processes is metered as its whole process tree.
        if "server" in self.pids:
            for k, child in enumerate(descendants(self.pids["server"])):
                self.pids[f"server-child{k}"] = child
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._system = self._server_kernel()

    def _server_kernel(self) -> float:
        total = 0.0
        for name, pid in self.pids.items():
            if name == "server" or name.startswith("server-child"):
                with contextlib.suppress(OSError):
                    total += cpu_split(pid)[1]
        return total

    def server_system(self) -> float:
        """Kernel CPU of the server over the window: socket writes on loopback also pay for
        delivering the packet into the receiver's socket."""
        return self._server_kernel() - self._system

    def stop(self) -> dict[str, float]:
        assert self._start is not None
        self.used = {}
        for name, pid in self.pids.items():
            try:
                self.used[name] = cpu_seconds(pid) - self._start[name]
            except OSError:  # the process ended already; its figure is reported by itself
                self.used[name] = float("nan")
        children = [n for n in self.used if n.startswith("server-child")]
        for name in children:
            self.used["server"] += self.used.pop(name)
        return self.used


def token(scopes: Iterable[str], sub: str = VIEWER, ttl: int = 3 * 3600) -> str:
    return mint_token(Settings(jwt_secret=TEST_SECRET), sub, list(scopes), ttl)


class TimeParser:
    """``updated_at`` (RFC 3339, ms) → Unix seconds, cheaply: the minute prefix is cached, so
    a load generator receiving 10,000 messages/s does not spend its CPU in strptime."""

    def __init__(self) -> None:
        self._minutes: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        prefix = text[:17]  # 2026-11-29T04:10:
        base = self._minutes.get(prefix)
        if base is None:
            base = datetime.fromisoformat(prefix + "00+00:00").timestamp()
            self._minutes[prefix] = base
        return base + float(text[17:-1])


def format_time(moment: float) -> str:
    """Unix seconds → the same millisecond RFC 3339 form Phasecast writes."""
    dt = datetime.fromtimestamp(moment, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def merge_histograms(parts: Iterable[Mapping[str, int] | Mapping[int, int]]) -> Counter[int]:
    total: Counter[int] = Counter()
    for part in parts:
        for key, count in part.items():
            total[int(key)] += count
    return total


def percentiles(histogram: Mapping[int, int]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds from a 10 µs-bucket histogram."""
    count = sum(histogram.values())
    if not count:
        return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    keys = sorted(histogram)
    found: dict[str, float | None] = {}
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        rank = q * count
        seen = 0
        for key in keys:
            seen += histogram[key]
            if seen >= rank:
                found[name] = round(key * BUCKET_US / 1000, 3)
                break
    found["max"] = round(keys[-1] * BUCKET_US / 1000, 3)
    found["count"] = count
    return found


def run_child(run: Callable[[dict[str, Any]], Coroutine[Any, Any, None]]) -> None:
    """Entry point of a harness child process: its JSON config is the first argument."""
    raise_nofile()
    config = json.loads(sys.argv[1])
    try:
        import uvloop

        uvloop.run(run(config))
    except ImportError:
        asyncio.run(run(config))
