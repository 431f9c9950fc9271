"""Server CPU per delivered SSE event, per-job streams against multiplexed ones, in process:
``python -m bench.sse_deliver [--sockets] [--baseline-src SRC]``.

``bench transports`` measures a whole server (the Redis feed, the hub, uvicorn, timers) on a
shared machine, where run-to-run noise is larger than the difference between the two SSE
routes. This isolates the delivery: the real ``EventStream`` objects of
``phasecast.server.sse`` attached (as ``phasecast serve`` attaches them) to transports, and
the real ``Hub.dispatch`` handing each change to its watchers' mailboxes. Nothing else runs.

- per-job (``sse``): ``--jobs`` jobs, ``--watchers-per-job`` streams per job, one job each;
- multiplexed (``ssemux``): the same watchers grouped 10 jobs to a stream
  (``GET /v1/events?job=…``), as ``bench transports`` groups them: 10 times fewer streams,
  each carrying 10 jobs.

Each round hands one change of every job to the hub (a change is a realistic ~600-byte state
JSON with a new seq), one job per event-loop iteration, as the Redis feed does.

Transports: by default a fake that only counts bytes (the Python work per delivery, and
what ``valgrind --tool=callgrind`` counts instruction by instruction: run with
``--callgrind``); with ``--sockets`` real loopback TCP connections drained by a reader
process, so the kernel's side of each write (and of the receiver's delivery, which a
loopback write pays for) is in the figure. CPU is this process's thread CPU time over the
measured rounds, divided by the events delivered; the two routes take turns, each several
times, and the median is reported.

With ``--baseline-src`` the same is run against another checkout's ``src/`` (a child
process per configuration), so before and after come from one invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

JOBS_PER_STREAM = 10
_STATE = (
    '{{"job_id":"{job}","owner":"bench-owner","kind":"image","phase":"running",'
    '"phase_progress":0.{pp:04d},"progress":0.{pp:04d},"message":"denoising step {seq} of 50",'
    '"eta_seconds":12.5,"seq":{seq},"epoch":"{epoch}","created_at":"2026-11-29T16:00:00.000000Z",'
    '"updated_at":"2026-11-29T16:00:{ss:02d}.{us:06d}Z","phases":{{"queued":{{"started_at":'
    '"2026-11-29T16:00:00.000000Z","ended_at":"2026-11-29T16:00:00.500000Z"}},"running":{{'
    '"started_at":"2026-11-29T16:00:00.500000Z","ended_at":null}}}},"steps":{{"denoise":{{'
    '"done":{seq},"total":50}}}},"steps_total":50,"error":null,"metadata":{{"model":"sdxl",'
    '"prompt":"a lighthouse at dusk"}}}}'
)


def _state_json(job: str, seq: int, epoch: str) -> str:
    return _STATE.format(job=job, seq=seq, epoch=epoch, pp=seq % 10000, ss=seq % 60, us=seq % 1000000)


class _CountingTransport:
    """Takes writes and counts their bytes (``asyncio.Transport`` as far as a stream uses it)."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.bytes += len(part)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _Sink(asyncio.Protocol):
    """The server end of one loopback connection: flow control forwarded to its stream."""

    stream: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.pause_writing()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.resume_writing()

    def data_received(self, data: bytes) -> None:
        pass


def _reader(port: int, count: int) -> None:
    """Child process: open ``count`` connections and read everything until they close."""
    selector = selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    open_ = count
    while open_:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(sock)
                sock.close()
                open_ -= 1


def _spawn_reader(port: int, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", f"from bench.sse_deliver import _reader; _reader({port}, {count})"],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )


async def _transports(count: int, sockets: bool) -> tuple[list[Any], list[_Sink], Any]:
    if not sockets:
        return [_CountingTransport() for _ in range(count)], [], None
    loop = asyncio.get_running_loop()
    sinks: list[_Sink] = []
    made = asyncio.Event()

    def factory() -> _Sink:
        sink = _Sink()
        sinks.append(sink)
        if len(sinks) == count:
            made.set()
        return sink

    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    child = _spawn_reader(port, count)
    await made.wait()
    assert child.stdout is not None
    await loop.run_in_executor(None, child.stdout.readline)
    return [sink.transport for sink in sinks], sinks, (server, child)


def _handshake(word: str) -> None:
    print(word, flush=True)
    sys.stdin.readline()


async def _run(
    route: str, jobs: int, per_job: int, rounds: int, sockets: bool,
    distinct: bool = False, pause: bool = False,
) -> dict[str, Any]:
    from phasecast.engines.base import Change
    from phasecast.fanout import Hub
    from phasecast.server.metrics import Metrics
    from phasecast.server.sse import EventStream

    loop = asyncio.get_running_loop()
    job_ids = [f"bench-{n:05d}-{'x' * 20}" for n in range(jobs)]
    epoch = "a1b2c3d4e5f6"
    settings = SimpleNamespace(max_subscriptions=100, ping_interval=60.0, sse_retry_ms=2000)
    found = SimpleNamespace(tracker=SimpleNamespace(hub=None), metrics=Metrics(), settings=settings)
    caller = SimpleNamespace(expires_at=time.time() + 3600, sub="bench-owner")
    hub = Hub.__new__(Hub)
    hub._jobs = {}
    ready = loop.create_future()
    ready.set_result(None)
    from phasecast.fanout import _JobWatchers

    for job_id in job_ids:
        hub._jobs[job_id] = _JobWatchers(ready)
    # Watcher w watches job w % jobs; multiplexed: consecutive watchers share a stream.
    watchers = jobs * per_job
    groups: list[list[str]] = []
    if route == "sse":
        groups = [[job_ids[w % jobs]] for w in range(watchers)]
    else:
        for first in range(0, watchers, JOBS_PER_STREAM):
            if distinct:
                # Every stream a different set of jobs (stream k: jobs k … k+9), each job
                # still on per_job streams: no two cursors are ever equal.
                k = first // JOBS_PER_STREAM
                groups.append([job_ids[(k + n) % jobs] for n in range(JOBS_PER_STREAM)])
            else:
                groups.append([job_ids[w % jobs] for w in range(first, min(watchers, first + JOBS_PER_STREAM))])
    transports, sinks, closing = await _transports(len(groups), sockets)
    streams = []
    for group, transport, index in zip(groups, transports, range(len(groups)), strict=True):
        stream = EventStream(found, caller, multiplexed=route == "ssemux")  # type: ignore[arg-type]
        stream.open.update(group)
        for job_id in group:
            hub._jobs[job_id].mailboxes.add(stream.mailbox)
        stream._attach(transport)
        if sinks:
            sinks[index].stream = stream
        streams.append(stream)
    seq = 0

    async def one_round() -> None:
        nonlocal seq
        seq += 1
        for job_id in job_ids:
            hub.dispatch(Change(job_id, seq, False, _state_json(job_id, seq, epoch), time.time()))
            await asyncio.sleep(0)

    for _ in range(3):  # warm-up: every stream has every job's entry in its cursor
        await one_round()
    if pause:  # under callgrind: the parent switches instrumentation on now, and off after
        await loop.run_in_executor(None, _handshake, "measure")
    delivered = 0
    started = time.thread_time()
    for _ in range(rounds):
        await one_round()
        delivered += watchers
    await asyncio.sleep(0)
    cpu = time.thread_time() - started
    if pause:
        await loop.run_in_executor(None, _handshake, "measured")
    written = sum(getattr(t, "bytes", 0) for t in transports)
    for stream in streams:
        stream.open.clear()  # the hub here is a bare dispatcher: nothing to unsubscribe from
        stream._closed()
    if closing is not None:
        server, child = closing
        for transport in transports:
            transport.close()
        server.close()
        await loop.run_in_executor(None, child.wait)
    return {
        "route": route,
        "streams": len(groups),
        "delivered": delivered,
        "cpu_us_per_event": round(cpu / delivered * 1e6, 3),
        "bytes_per_event": round(written / (delivered + 3 * watchers), 1) if written else None,
    }


def _child(route: str, args: argparse.Namespace, src: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "bench.sse_deliver", "--one", route, "--jobs", str(args.jobs),
        "--watchers-per-job", str(args.watchers_per_job), "--rounds", str(args.rounds),
        *(["--sockets"] if args.sockets else []),
        *(["--distinct"] if args.distinct else []),
    ]
    if args.callgrind:
        return _callgrind(command, env)
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _callgrind(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``command`` under callgrind with instrumentation on only over the measured
    rounds: instructions executed per delivered event, the same on a loaded machine."""
    out_file = Path(f"/tmp/sse-deliver-{os.getpid()}-{time.monotonic_ns()}.callgrind")
    env = {**env, "PYTHONHASHSEED": "0"}
    child = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=no",
            f"--callgrind-out-file={out_file}", *command, "--pause",
        ],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    for word, switch in (("measure", "on"), ("measured", "off")):
        line = child.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"callgrind child said {line!r}, expected {word!r}")
        subprocess.run(["callgrind_control", "-i", switch, str(child.pid)], check=True, capture_output=True)
        child.stdin.write("\n")
        child.stdin.flush()
    result: dict[str, Any] = json.loads(child.stdout.readline())
    child.wait()
    instructions = 0
    for line in out_file.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            instructions = int(line.split()[1])
    out_file.unlink()
    result["instructions_per_event"] = round(instructions / result["delivered"])
    result["cpu_us_per_event"] = result["instructions_per_event"]  # what is compared
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--watchers-per-job", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20, help="changes per job measured")
    parser.add_argument("--repeat", type=int, default=5, help="runs per configuration, taking turns")
    parser.add_argument("--sockets", action="store_true", help="real loopback TCP connections")
    parser.add_argument("--routes", default="sse,ssemux")
    parser.add_argument("--baseline-src", help="also run another checkout's src/, taking turns")
    parser.add_argument(
        "--distinct", action="store_true",
        help="multiplexed: no two streams watch the same jobs (no cursor is shared)",
    )
    parser.add_argument(
        "--callgrind", action="store_true",
        help="count instructions per event under valgrind (only the measured rounds)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--pause", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import uvloop

        result = uvloop.run(
            _run(
                args.one, args.jobs, args.watchers_per_job, args.rounds, args.sockets,
                distinct=args.distinct, pause=args.pause,
            )
        )
        print(json.dumps(result))
        return
    sources: dict[str, str | None] = {"": None}
    if args.baseline_src:
        sources["@base"] = args.baseline_src
    found: dict[str, list[dict[str, Any]]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeat):
        for route in args.routes.split(","):
            for label, src in sources.items():
                result = _child(route, args, src)
                found.setdefault(route + label, []).append(result)
        load.append(os.getloadavg()[0])
    summary = {}
    for name, results in found.items():
        figures = [r["cpu_us_per_event"] for r in results]
        summary[name] = {
            "cpu_us_per_event_median": statistics.median(figures),
            "runs": figures,
            "bytes_per_event": results[0]["bytes_per_event"],
            "streams": results[0]["streams"],
        }
        unit = "instructions/event" if args.callgrind else "CPU-µs/event"
        print(f"{name:14} {statistics.median(figures):9.3f} {unit} (runs {figures})")
    print(json.dumps({"load_1m": load, "sockets": args.sockets, "results": summary}))


if __name__ == "__main__":
    main()
