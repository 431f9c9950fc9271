"""The Redis pub/sub read path alone: subscriber CPU-µs per change received.

``python -m bench.feed_read [--src DIR ...] [--rate N] [--seconds S] [--repeat R]``

A private redis-server; in a child process per ``--src`` checkout (default: this one), that
checkout's ``RedisFeed`` listens to 100 jobs; a publisher process PUBLISHes changes of the
size Phasecast publishes (a 600-byte state) at ``--rate`` per second, spread over the jobs.
The child's CPU time while the changes arrive, divided by the changes it emitted, is the cost
of reading and decoding one change (shared by every watcher of the job). The checkouts take
turns, ``--repeat`` times; figures are per run and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

JOBS = 100

CHILD = r"""
import asyncio, json, resource, sys, time
from phasecast.engines.base import Change
from phasecast.engines.redis import _raw_connection
from phasecast.engines.redis_feed import RedisFeed

url, total = sys.argv[1], int(sys.argv[2])

async def main():
    got = 0
    done = asyncio.get_running_loop().create_future()
    started = []

    def emit(change):
        nonlocal got
        if change.seq == 0:
            return
        if not started:
            started.append(resource.getrusage(resource.RUSAGE_SELF))
        got += 1
        if got == total and not done.done():
            done.set_result(resource.getrusage(resource.RUSAGE_SELF))

    async def load(job_id):
        return None

    async def nothing():
        return None

    feed = RedisFeed(
        sharded=False, channel_of=lambda j: "feedbench:" + j, owner_of=lambda c: "one",
        primaries=lambda: ["one"], idle_channel=lambda n: "feedbench-idle",
        connect=lambda node: _raw_connection(url), refresh=nothing, load=load, emit=emit,
    )
    await feed.start(10)
    for j in range(JOBS):
        await feed.listen(f"job{j}", 10)
    print("ready", flush=True)
    try:
        ended = await asyncio.wait_for(done, 120)
    except TimeoutError:
        ended = None
    cpu = user = None
    if ended is not None and started:
        user = ended.ru_utime - started[0].ru_utime
        cpu = user + ended.ru_stime - started[0].ru_stime
    print(json.dumps({"received": got, "cpu_s": cpu, "user_s": user}), flush=True)
    await feed.stop()

JOBS = %d
import uvloop
uvloop.run(main())
"""

PUBLISHER = r"""
import sys, time, redis
url, rate, total = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
client = redis.Redis.from_url(url)
state = '{"job_id":"%%s","seq":%%d,"phase":"render","progress":0.5,"message":"' + "x" * 520 + '"}'
burst = max(1, int(rate / 400))  # every 2.5 ms
sent = 0
next_at = time.perf_counter()
while sent < total:
    pipe = client.pipeline(transaction=False)
    for _ in range(min(burst, total - sent)):
        sent += 1
        job = "job%%d" %% (sent %% %d)
        pipe.publish("feedbench:" + job, "%%d|0|%%.3f|%%s|%%s" %% (sent, time.time(), job, state %% (job, sent)))
    pipe.execute()
    next_at += burst / rate
    delay = next_at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
"""


def run_once(src: str, url: str, rate: float, seconds: float) -> dict[str, object]:
    total = int(rate * seconds)
    env = dict(os.environ, PYTHONPATH=src)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD % JOBS, url, str(total)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError("feed child failed to start")
    subprocess.run([sys.executable, "-c", PUBLISHER % JOBS, url, str(rate), str(total)], check=True)
    result = json.loads(child.stdout.readline())
    child.wait(30)
    cpu = result["cpu_s"]
    return {
        "src": src,
        "received": result["received"],
        "us_per_change": round(cpu / result["received"] * 1e6, 2) if cpu else None,
        "user_us_per_change": round(result["user_s"] / result["received"] * 1e6, 2) if cpu else None,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.feed_read", description=__doc__)
    here = str(Path(__file__).resolve().parents[1] / "src")
    parser.add_argument("--src", action="append", help="a checkout's src/ (repeatable)")
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sources = args.src or [here]
    from tests.support.process import PrivateRedis

    runs: dict[str, list[float]] = {s: [] for s in sources}
    with PrivateRedis() as redis:
        for _ in range(args.repeat):
            for src in sources:
                result = run_once(src, redis.url, args.rate, args.seconds)
                print(json.dumps(result), flush=True)
                if result["us_per_change"] is not None:
                    runs[src].append(float(result["us_per_change"]))  # type: ignore[arg-type]
    for src, values in runs.items():
        median = statistics.median(values) if values else None
        print(f"{src}: median {median} CPU-µs per change received ({values})")


if __name__ == "__main__":
    main()
