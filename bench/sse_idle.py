"""Server RSS per idle SSE stream: ``python -m bench.sse_idle [--streams N]``.

Starts ``phasecast serve`` (SQLite), creates jobs, opens N idle streams over raw sockets
(per-job streams, and multiplexed streams of 10 jobs each), lets the server settle and reports
the growth of its RSS per stream. Run once with the raw path (the default) and once with
``PHASECAST_SSE_TRANSPORT=asgi`` (every event through ASGI ``send``), each in a fresh server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import quote

import httpx
from tests.support.process import ServerProcess

from bench.common import VIEWER, rss_kb, token

JOBS_PER_STREAM = 10
SETTLE_SECONDS = 3.0


async def _open(port: int, path: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:60].decode())
    return writer


def measure(kind: str, streams: int, direct: bool) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="phasecast-sse-idle-"))
    env = {"PHASECAST_PING_INTERVAL": "60", "PHASECAST_SSE_TRANSPORT": "raw" if direct else "asgi"}
    server = ServerProcess(f"sqlite:///{folder / 'db'}", env=env, log_path=folder / "log")
    with server:
        writer = token(["jobs:write"], sub="bench-writer")
        viewer = token(["jobs:read"])
        jobs = [f"idle-{i}" for i in range(max(streams, JOBS_PER_STREAM) if kind == "per-job" else 1000)]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {writer}"}) as api:
            for job_id in jobs:
                api.post("/v1/jobs", json={"job_id": job_id, "owner": VIEWER}).raise_for_status()

        def path(i: int) -> str:
            if kind == "per-job":
                return f"/v1/jobs/{jobs[i % len(jobs)]}/events?access_token={quote(viewer)}"
            picked = [jobs[(i * JOBS_PER_STREAM + k) % len(jobs)] for k in range(JOBS_PER_STREAM)]
            return "/v1/events?access_token=" + quote(viewer) + "".join(f"&job={j}" for j in picked)

        async def run() -> dict[str, object]:
            # Warm up (imports, caches, the jobs' hub entries), then measure.
            warm = [await _open(server.port, path(i)) for i in range(50)]
            await asyncio.sleep(SETTLE_SECONDS)
            before = rss_kb(server.pid)
            opened = []
            limit = asyncio.Semaphore(50)

            async def one(i: int) -> None:
                async with limit:
                    opened.append(await _open(server.port, path(i)))

            await asyncio.gather(*(one(i) for i in range(50, 50 + streams)))
            await asyncio.sleep(SETTLE_SECONDS)
            after = rss_kb(server.pid)
            for w in warm + opened:
                w.close()
            return {
                "kind": kind,
                "transport": "raw" if direct else "asgi",
                "streams": len(opened),
                "rss_before_kb": before,
                "rss_after_kb": after,
                "kb_per_stream": round((after - before) / len(opened), 2),
            }

        return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}")
    for kind in ("per-job", "multiplexed"):
        for direct in (True, False):
            print(json.dumps(measure(kind, args.streams, direct)), flush=True)


if __name__ == "__main__":
    main()
