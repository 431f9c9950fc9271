"""The delivery path alone: server CPU-µs per delivered WebSocket message, from a change
handed to the hub to the bytes written to each watcher's socket.

``python -m bench.dispatch_cost [--src DIR ...] [--jobs N] [--per-job W] [--changes C] [--repeat R]``

In a child process per ``--src`` checkout (default: this one), and on uvloop as the server
runs: ``jobs * per_job`` watchers, each a real ``RawWebSocketProtocol`` with an open session
over its own Unix socket pair (the peer ends are drained by a second child process, so the
kernel's send is real and the buffers never fill); then ``changes`` changes per job are
dispatched through the real ``Hub.dispatch``, a loop turn per job round as the pub/sub
read delivers them. The child's CPU time (user + system, ``getrusage``) over the dispatch,
divided by the messages written, is the cost per delivered message without Redis, the load
generator and the handshakes: the part of the fan-out a change of the dispatch path moves.
The checkouts take turns, ``--repeat`` times; figures are per run and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import asyncio, gc, json, os, resource, socket, sys, time
from datetime import UTC, datetime
from types import SimpleNamespace

import uvloop

from phasecast.engines.base import Change
from phasecast.fanout import Hub, Mailbox
from phasecast.model import new_job
from phasecast.server import rawws, websocket

jobs, per_job, changes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Feed:
    async def listen(self, job_id):
        return None

    async def unlisten(self, job_id):
        return None


def drain(fds):
    # The peers' ends: read and drop everything, until all are closed.
    import selectors
    sel = selectors.DefaultSelector()
    for fd in fds:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    open_fds = len(fds)
    while open_fds:
        for key, _ in sel.select():
            try:
                data = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
    os._exit(0)


async def main():
    loop = asyncio.get_running_loop()
    states = {}
    ids = [f"job{i:05d}" for i in range(jobs)]
    for job_id in ids:
        state = new_job(job_id=job_id, owner="bench", kind="comic", metadata={}, now=datetime.now(UTC))
        states[job_id] = state

    async def load(job_id):
        return states[job_id]

    hub = Hub(Feed(), load)
    counter = SimpleNamespace(labels=lambda *a: SimpleNamespace(inc=lambda n=1: None, dec=lambda n=1: None))
    metrics = SimpleNamespace(
        messages=counter,
        connections=counter,
        latency=SimpleNamespace(labels=lambda *a: SimpleNamespace(observe=lambda v: None)),
    )
    meter = websocket.DeliveryMeter(metrics, "websocket")
    config = SimpleNamespace(loaded=True, loaded_app=None, load=lambda: None, ws_max_size=1 << 16)
    server_state = SimpleNamespace(connections=set())
    pairs = [socket.socketpair() for _ in range(jobs * per_job)]
    peer_fds = [b.detach() for _, b in pairs]
    pid = os.fork()
    if pid == 0:
        for a, _ in pairs:
            a.close()  # only the parent keeps the server ends: the peers see their EOF
        drain(peer_fds)
    for fd in peer_fds:
        os.close(fd)
    protocols = []
    for n, (a, _) in enumerate(pairs):
        _, proto = await loop.connect_accepted_socket(
            lambda: rawws.RawWebSocketProtocol(config, server_state, {}), a
        )
        session = websocket.Session.__new__(websocket.Session)
        session.hub = hub
        session.link = proto
        session.mailbox = hub_mailbox = Mailbox()
        session.jobs = set()
        session.closed = False
        session._meter = meter
        proto.session = session
        proto._meter = meter
        proto.open = True
        hub_mailbox.direct = proto._direct
        hub_mailbox.wakeup = proto._flush
        if hasattr(proto, "_update_lane"):
            proto._update_lane()
        job_id = ids[n % jobs]
        session.jobs.add(job_id)
        await hub.subscribe(job_id, hub_mailbox)
        protocols.append(proto)
    await asyncio.sleep(0.5)
    gc.collect()
    gc.freeze()
    base = {job_id: states[job_id].to_json() for job_id in ids}
    prepared = [
        [Change(job_id, seq, False, base[job_id], time.time()) for job_id in ids]
        for seq in range(2, changes + 2)
    ]
    await asyncio.sleep(0.2)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for round_ in prepared:
        for change in round_:
            hub.dispatch(change)
        await asyncio.sleep(0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    messages = jobs * per_job * changes
    for proto in protocols:
        proto.transport.close()
    await asyncio.sleep(0.5)
    os.waitpid(pid, 0)
    print(json.dumps({
        "messages": messages,
        "cpu_us_per_msg": round(cpu / messages * 1e6, 3),
        "sys_us_per_msg": round((after.ru_stime - before.ru_stime) / messages * 1e6, 3),
        "wall_s": round(wall, 3),
    }))

uvloop.run(main())
"""


def run(src: str, jobs: int, per_job: int, changes: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(jobs), str(per_job), str(changes)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child for {src} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", help="a checkout's src/ (repeatable)")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--per-job", type=int, default=10)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sources = [str(Path(s).resolve()) for s in (args.src or ["src"])]
    with open("/proc/loadavg") as handle:
        print(f"load before: {handle.read().strip()}", flush=True)
    figures: dict[str, list[float]] = {s: [] for s in sources}
    for _ in range(args.repeat):
        for src in sources:
            result = run(src, args.jobs, args.per_job, args.changes)
            figures[src].append(result["cpu_us_per_msg"])
            print(f"{src}: {result}", flush=True)
    for src, values in figures.items():
        print(f"{src}: CPU-µs per message {values} median {statistics.median(values)}")


if __name__ == "__main__":
    main()
