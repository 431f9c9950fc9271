"""What one progress report costs Redis: ``python -m bench.redis_cost [reports]``.

Runs reports through the real engine (``RedisEngine.apply``, the atomic step used by every
report) against a private redis-server with one subscriber per job listening (as one server
process watching them would), and reads from Redis itself: its CPU (``/proc``), commands
(``INFO commandstats``) and network bytes in and out (``INFO stats``), per report. The
figures feed the capacity model in docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from tests.support.process import PrivateRedis

from phasecast.engines.base import Change, RuleInputs
from phasecast.engines.redis import RedisEngine
from phasecast.model import Phase, ProgressUpdate, new_job, utc_now
from phasecast.progress import COMIC_WEIGHTS

JOBS = 100


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def snapshot(client: redis.Redis, pid: int) -> dict[str, Any]:
    stats = client.info("stats")
    commands = client.info("commandstats")
    return {
        "cpu": cpu_seconds(pid),
        "in": stats["total_net_input_bytes"],
        "out": stats["total_net_output_bytes"],
        "calls": {k.removeprefix("cmdstat_"): v["calls"] for k, v in commands.items()},
        "usec": {k.removeprefix("cmdstat_"): v["usec"] for k, v in commands.items()},
    }


async def run(reports: int) -> dict[str, Any]:
    with PrivateRedis() as server:
        assert server.process is not None
        delivered = 0

        def on_change(change: Change) -> None:
            nonlocal delivered
            delivered += 1

        engine = RedisEngine(f"{server.url}?prefix=cost")
        await engine.start(on_change)
        try:
            ids = [f"job-{i}" for i in range(JOBS)]
            for job_id in ids:
                await engine.insert(new_job(job_id=job_id, owner="alice", kind="comic",
                                            metadata={"title": "A comic"}, now=utc_now()))
                await engine.listen(job_id)
            inputs = RuleInputs(kind="comic", owner="alice", weights=dict(COMIC_WEIGHTS), stats={})
            admin = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
            before = snapshot(admin, server.process.pid)
            started = time.perf_counter()
            now = utc_now()
            sizes: list[int] = []
            for n in range(reports):
                job_id = ids[n % JOBS]
                step = f"panel-{(n // JOBS) % 6 + 1}"
                update = ProgressUpdate(Phase.GENERATING, step=step,
                                        step_progress=float(min(100, (n // JOBS) % 100 + 1)),
                                        message=f"Drawing {step}")
                decided = await engine.apply(job_id, update, now + timedelta(milliseconds=n), inputs)
                sizes.append(len(decided.state_json.encode()) if hasattr(decided, "state_json") else 0)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0.5)  # the last publications reach the subscriber
            after = snapshot(admin, server.process.pid)
            admin.close()
        finally:
            await engine.stop()
    calls = {k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in after["calls"]}
    calls = {k: v for k, v in calls.items() if v}
    return {
        "reports": reports,
        "jobs": JOBS,
        "delivered_to_subscriber": delivered,
        "seconds": round(elapsed, 3),
        "state_json_bytes_median": sorted(sizes)[len(sizes) // 2],
        "redis_cpu_us_per_report": round((after["cpu"] - before["cpu"]) / reports * 1e6, 1),
        "redis_bytes_in_per_report": round((after["in"] - before["in"]) / reports),
        "redis_bytes_out_per_report": round((after["out"] - before["out"]) / reports),
        # Time Redis spent in the script (the commands it calls, the publish to the
        # subscriber included), without its network and event-loop work; wall time, so a
        # busy machine inflates it.
        "redis_script_us_per_report": round(
            (after["usec"].get("evalsha", 0) - before["usec"].get("evalsha", 0)) / reports, 1
        ),
        "redis_calls_per_report": {k: round(v / reports, 3) for k, v in sorted(calls.items())},
    }


def main() -> None:
    reports = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    print(json.dumps(asyncio.run(run(reports)), indent=2))


if __name__ == "__main__":
    main()
