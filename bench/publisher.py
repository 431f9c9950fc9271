"""Publisher process: applies progress updates at a fixed rate (or as fast as it can).

Modes, all writing the same kind of state change:
- ``http``: ``POST /v1/jobs/{id}/progress`` to the server under test (keep-alive HTTP/1.1);
- ``tracker``: an in-process ``ProgressTracker`` on the same engine URL as the server (Redis:
  the server hears the change through pub/sub; SQLite: ingest only, the file's fan-out is
  in-process to whoever wrote it);
- ``sio``: python-socketio's write-only ``AsyncRedisManager.emit`` (the baseline);
- ``redis``: a bare ``PUBLISH`` of the state JSON (the floor).

Every update carries ``message = "t=<send time>"``, so the watcher can also measure the
whole path from the publisher's call, and every update is a real change (seq moves).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bench.common import cpu_seconds, format_time, run_child
from bench.control import command_queue, emit

Write = Callable[[str, int], Awaitable[int | None]]  # (job, n) -> new seq, or None if not applied


class Publisher:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.jobs: list[str] = config["jobs"]
        self.seqs: dict[str, int] = {}
        self.applied_per_job: dict[str, int] = {}
        self.sent = 0
        self.applied = 0
        self.errors: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.durations: list[float] = []  # seconds per write call, for the report
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    async def setup(self) -> Write:
        mode = self.config["mode"]
        if mode == "http":
            return await self._http()
        if mode == "batch":
            return await self._http_batch()
        if mode == "tracker":
            return await self._tracker()
        if mode == "sio":
            return await self._sio()
        if mode == "redis":
            return await self._redis()
        raise ValueError(f"unknown publisher mode {mode!r}")

    async def _http(self) -> Write:
        from bench.rawclient import HTTPConnection

        # One keep-alive connection per concurrent writer, handed out from a free list.
        free: list[HTTPConnection] = [
            HTTPConnection(
                "127.0.0.1", self.config["port"], {"Authorization": f"Bearer {self.config['token']}"}
            )
            for _ in range(self.config.get("concurrency", 64))
        ]
        for connection in free:
            self._closers.append(connection.close)

        async def write(job: str, n: int) -> int | None:
            body = {"phase": "GENERATING", "phase_progress": _progress(n), "message": f"t={time.time():.6f}"}
            connection = free.pop()
            try:
                status, raw = await connection.post(f"/v1/jobs/{job}/progress", json.dumps(body).encode())
            finally:
                free.append(connection)
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            data = json.loads(raw)
            return int(data["state"]["seq"]) if data["applied"] else None

        return write

    async def _http_batch(self) -> Write:
        """Reports issued in the same event-loop turn go out together in one
        ``POST /v1/progress``, as a backend reporting many panels or jobs would send them."""
        from bench.rawclient import HTTPConnection

        connection = HTTPConnection(
            "127.0.0.1", self.config["port"], {"Authorization": f"Bearer {self.config['token']}"}
        )
        self._closers.append(connection.close)
        queued: list[tuple[dict[str, Any], asyncio.Future[int | None]]] = []
        sender: list[asyncio.Task[None]] = []

        async def send_queued() -> None:
            while queued:
                await asyncio.sleep(0)  # one loop turn: let the other writers queue theirs
                batch = queued[:500]
                del queued[:500]
                try:
                    status, raw = await connection.post(
                        "/v1/progress", json.dumps({"updates": [u for u, _ in batch]}).encode()
                    )
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}")
                    results = json.loads(raw)["results"]
                except Exception as exc:
                    for _, future in batch:
                        future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if "error" in result:
                        future.set_exception(RuntimeError(result["error"]["code"]))
                    else:
                        future.set_result(int(result["seq"]) if result["applied"] else None)

        async def write(job: str, n: int) -> int | None:
            future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            queued.append((
                {"job_id": job, "phase": "GENERATING", "phase_progress": _progress(n),
                 "message": f"t={time.time():.6f}"},
                future,
            ))
            if not sender or sender[0].done():
                sender[:] = [asyncio.create_task(send_queued())]
            return await future

        return write

    async def _tracker(self) -> Write:
        from phasecast.engines import open_engine
        from phasecast.tracker import ProgressTracker

        tracker = ProgressTracker(open_engine(self.config["engine"]))
        await tracker.start()
        self._closers.append(tracker.stop)

        async def write(job: str, n: int) -> int | None:
            outcome = await tracker.report(job, "GENERATING", _progress(n), f"t={time.time():.6f}")
            return outcome.state.seq if outcome.applied else None

        return write

    def _template(self) -> Callable[[str, int], dict[str, Any]]:
        """A state of the same shape and size as Phasecast's, for the baselines that have
        no state of their own."""
        from phasecast.model import new_job

        base = new_job(
            job_id="template", owner="bench-viewer", kind="comic", metadata={}, now=datetime.now(UTC)
        ).to_dict()
        counters: dict[str, int] = {}

        def state(job: str, n: int) -> dict[str, Any]:
            seq = counters.get(job, 1) + 1
            counters[job] = seq
            now = time.time()
            return {
                **base,
                "job_id": job,
                "phase": "GENERATING",
                "phase_progress": _progress(n),
                "progress": 10 + _progress(n) * 0.7,
                "seq": seq,
                "updated_at": format_time(now),
                "message": f"t={now:.6f}",
            }

        return state

    async def _sio(self) -> Write:
        import socketio

        manager = socketio.AsyncRedisManager(
            self.config["redis_url"], channel=self.config["channel"], write_only=True
        )
        make = self._template()

        async def write(job: str, n: int) -> int | None:
            data = make(job, n)
            await manager.emit("state", data, room=job)
            return int(data["seq"])

        return write

    async def _redis(self) -> Write:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.config["redis_url"])
        self._closers.append(client.aclose)
        make = self._template()
        prefix = self.config["channel"]

        async def write(job: str, n: int) -> int | None:
            data = make(job, n)
            await client.publish(f"{prefix}:{job}", json.dumps(data, separators=(",", ":")))
            return int(data["seq"])

        return write

    # --- driving -------------------------------------------------------------------------

    async def _one(self, write: Write, job: str, n: int) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        started = time.monotonic()
        try:
            seq = await write(job, n)
            self.durations.append(time.monotonic() - started)
        except Exception as exc:
            key = type(exc).__name__ + ": " + str(exc)[:60]
            self.errors[key] = self.errors.get(key, 0) + 1
            return
        finally:
            self.in_flight -= 1
        if seq is not None:
            self.applied += 1
            self.applied_per_job[job] = self.applied_per_job.get(job, 0) + 1
            self.seqs[job] = max(seq, self.seqs.get(job, 0))

    async def paced(self, write: Write, rate: float, seconds: float) -> None:
        """``rate`` updates/s, round-robin over the jobs, for ``seconds``; at most
        ``concurrency`` in flight (past that the publisher is behind, which is reported)."""
        limit = asyncio.Semaphore(self.config.get("concurrency", 64))
        total = int(rate * seconds)
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()

        async def fire(index: int) -> None:
            async with limit:
                await self._one(write, self.jobs[index % len(self.jobs)], index // len(self.jobs))

        while self.sent < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            while self.sent < due:
                task = asyncio.create_task(fire(self.sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.sent += 1
            await asyncio.sleep(0.001)
        if tasks:
            await asyncio.wait(tasks, timeout=60)

    async def flat_out(self, write: Write, seconds: float) -> None:
        """As fast as possible with ``concurrency`` writers, each on its own slice of jobs
        (so writers never contend for one job's compare-and-set)."""
        concurrency = self.config.get("concurrency", 32)
        deadline = time.monotonic() + seconds

        async def worker(k: int) -> None:
            mine = self.jobs[k::concurrency] or self.jobs
            n = 0
            while time.monotonic() < deadline:
                job = mine[n % len(mine)]
                self.sent += 1
                await self._one(write, job, n // len(mine))
                n += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def run(config: dict[str, Any]) -> None:
    publisher = Publisher(config)
    commands = command_queue()
    write = await publisher.setup()
    emit("ready")
    while (await commands.get())["cmd"] != "go":
        pass
    cpu0, t0 = cpu_seconds(os.getpid()), time.monotonic()
    if config.get("rate"):
        await publisher.paced(write, config["rate"], config["seconds"])
    else:
        await publisher.flat_out(write, config["seconds"])
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(os.getpid()) - cpu0
    emit(
        "result",
        sent=publisher.sent,
        applied=publisher.applied,
        errors=publisher.errors,
        seqs=publisher.seqs,
        applied_per_job=publisher.applied_per_job,
        elapsed=round(elapsed, 3),
        cpu_seconds=round(cpu, 3),
        max_in_flight=publisher.max_in_flight,
        write_ms=_quantiles(publisher.durations),
    )
    for close in publisher._closers:
        await close()


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1] * 1000, 3)}


def _progress(n: int) -> float:
    return round(min(99.0, n * 0.001), 3)


def main() -> None:
    run_child(run)


if __name__ == "__main__":
    main()
