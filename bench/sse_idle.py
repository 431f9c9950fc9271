"""Server RSS per idle SSE stream: ``python -m bench.sse_idle [--streams N]``.

Starts ``phasecast serve`` (SQLite, or Redis with ``--engine redis``), creates jobs, opens N
idle streams over raw sockets (per-job streams, and multiplexed streams of 10 jobs each), lets
the server settle and reports the growth of its RSS per stream, three ways:

- ``kb_per_stream``: after 50 warm-up streams (imports, caches, first-use allocations and the
  jobs' own state are paid for before the measured streams open; every measured stream
  watches jobs that are already watched): what one more stream costs.
- ``kb_per_stream_fresh_jobs``: streams whose jobs nobody watched yet: each stream also pays
  for its jobs' hub entries and change-feed subscriptions (shared by every later watcher of
  those jobs).
- ``kb_per_stream_from_cold``: from before the first stream of the process, as ``bench
  fanout``/``transports`` measure it: the one-off warm-up and the jobs' state divided over
  the streams opened. With few streams (200 multiplexed streams in ``bench transports``) this
  is dominated by the one-off part.

Run once per path: raw (the default) and ``PHASECAST_SSE_TRANSPORT=asgi`` (every event
through ASGI ``send``), each in a fresh server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
from tests.support.process import ServerProcess
from tests.support.redis_servers import delete_prefix

from bench.common import VIEWER, rss_kb, token

REDIS = "redis://127.0.0.1:6379/0"
JOBS_PER_STREAM = 10
WARM_STREAMS = 50
SETTLE_SECONDS = 3.0


async def _open(port: int, path: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:60].decode())
    return writer


def measure(
    kind: str, streams: int, direct: bool, engine: str, server_src: str | None = None
) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="phasecast-sse-idle-"))
    env = {"PHASECAST_PING_INTERVAL": "60", "PHASECAST_SSE_TRANSPORT": "raw" if direct else "asgi"}
    if server_src:
        env["PYTHONPATH"] = str(Path(server_src).resolve())
    prefix = f"bench-sse-idle-{uuid.uuid4().hex[:8]}"
    url = f"{REDIS}?prefix={prefix}" if engine == "redis" else f"sqlite:///{folder / 'db'}"
    server = ServerProcess(url, env=env, log_path=folder / "log")
    per_stream = 1 if kind == "per-job" else JOBS_PER_STREAM
    with server:
        writer = token(["jobs:write"], sub="bench-writer")
        viewer = token(["jobs:read"])
        # Three groups of jobs: warm-up, measured (watched by the warm-up streams already),
        # fresh (watched by nobody before the last group of streams opens).
        watched = [f"idle-w{i}" for i in range(WARM_STREAMS * per_stream)]
        fresh = [f"idle-f{i}" for i in range(streams * per_stream)]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {writer}"}) as api:
            for job_id in watched + fresh:
                api.post("/v1/jobs", json={"job_id": job_id, "owner": VIEWER}).raise_for_status()

        def path(jobs: list[str], i: int) -> str:
            picked = [jobs[(i * per_stream + k) % len(jobs)] for k in range(per_stream)]
            if kind == "per-job":
                return f"/v1/jobs/{picked[0]}/events?access_token={quote(viewer)}"
            return "/v1/events?access_token=" + quote(viewer) + "".join(f"&job={j}" for j in picked)

        async def open_many(jobs: list[str], count: int) -> list[asyncio.StreamWriter]:
            limit = asyncio.Semaphore(50)
            opened: list[asyncio.StreamWriter] = []

            async def one(i: int) -> None:
                async with limit:
                    opened.append(await _open(server.port, path(jobs, i)))

            await asyncio.gather(*(one(i) for i in range(count)))
            await asyncio.sleep(SETTLE_SECONDS)
            return opened

        async def run() -> dict[str, object]:
            await asyncio.sleep(SETTLE_SECONDS)
            cold = rss_kb(server.pid)
            warm = await open_many(watched, WARM_STREAMS)
            before = rss_kb(server.pid)
            # The measured streams watch the warm-up streams' jobs (each job shared).
            measured = await open_many(watched, streams)
            after = rss_kb(server.pid)
            fresh_streams = await open_many(fresh, streams)
            after_fresh = rss_kb(server.pid)
            for w in warm + measured + fresh_streams:
                w.close()
            return {
                "kind": kind,
                "engine": engine,
                "server_src": server_src,
                "transport": "raw" if direct else "asgi",
                "streams": len(measured),
                "jobs_per_stream": per_stream,
                "rss_cold_kb": cold,
                "rss_before_kb": before,
                "rss_after_kb": after,
                "rss_after_fresh_kb": after_fresh,
                "kb_per_stream": round((after - before) / len(measured), 2),
                "kb_per_stream_fresh_jobs": round((after_fresh - after) / len(fresh_streams), 2),
                "kb_per_stream_from_cold": round(
                    (after - cold) / (len(measured) + len(warm)), 2
                ),
            }

        try:
            return asyncio.run(run())
        finally:
            if engine == "redis":
                delete_prefix(REDIS, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--engine", default="sqlite", choices=["sqlite", "redis"])
    parser.add_argument("--kinds", default="per-job,multiplexed")
    parser.add_argument("--transports", default="raw,asgi")
    parser.add_argument("--baseline-src", "--ab", dest="ab",
                        help="also measure the server of this src/ (another checkout's), taking turns")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}")
    for kind in args.kinds.split(","):
        for transport in args.transports.split(","):
            for src in (None, args.ab) if args.ab else (None,):
                result = measure(kind, args.streams, transport == "raw", args.engine, src)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
