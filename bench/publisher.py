"""Publisher process: applies progress updates at a fixed rate (or as fast as it can).

Modes, all writing the same kind of state change:
- ``http``: ``POST /v1/jobs/{id}/progress`` to the server under test (keep-alive HTTP/1.1,
  pipelined: ``Pipe``);
- ``batch``: ``POST /v1/progress`` with many reports per request;
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
import collections
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
        self.flat_pipes: list[Pipe] = []

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

    def _pipes(self, count: int) -> list[Pipe]:
        pipes = [Pipe("127.0.0.1", self.config["port"]) for _ in range(count)]
        for pipe in pipes:
            self._closers.append(pipe.close)
        return pipes

    async def _http(self) -> Write:
        """``POST /v1/jobs/{id}/progress`` on keep-alive connections (``bench.publisher.Pipe``);
        one job always goes over the same connection, so its reports apply in order."""
        pipes = self._pipes(self.config.get("connections") or self.config.get("concurrency", 64))
        for pipe in pipes:
            await pipe.open()
        requests = RequestMaker(self.config)
        index = {job: k % len(pipes) for k, job in enumerate(self.jobs)}

        async def write(job: str, n: int) -> int | None:
            future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
            pipes[index[job]].send(requests.single(job, n), future)
            status, raw = await future
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            return _seq(raw) if raw.startswith(APPLIED) else None

        return write

    async def _http_batch(self) -> Write:
        """Reports issued in the same event-loop turn go out together in one
        ``POST /v1/progress``, as a backend reporting many panels or jobs would send them
        (paced runs; flat-out runs use ``flat_out_http``)."""
        pipe = self._pipes(1)[0]
        await pipe.open()
        requests = RequestMaker(self.config)
        queued: list[tuple[str, int, asyncio.Future[int | None]]] = []
        sender: list[asyncio.Task[None]] = []

        async def send_queued() -> None:
            while queued:
                await asyncio.sleep(0)  # one loop turn: let the other writers queue theirs
                batch = queued[:500]
                del queued[:500]
                reply: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
                pipe.send(requests.batch([(job, n) for job, n, _ in batch]), reply)
                try:
                    status, raw = await reply
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}")
                    results = json.loads(raw)["results"]
                except Exception as exc:
                    for _, _, future in batch:
                        future.set_exception(exc)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if "error" in result:
                        future.set_exception(RuntimeError(result["error"]["code"]))
                    else:
                        future.set_result(int(result["seq"]) if result["applied"] else None)

        async def write(job: str, n: int) -> int | None:
            future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            queued.append((job, n, future))
            if not sender or sender[0].done():
                sender[:] = [asyncio.create_task(send_queued())]
            return await future

        return write

    async def open_flat_out(self) -> list[Pipe]:
        window = self.config.get("window", 2)
        count = self.config.get("connections") or max(1, self.config.get("concurrency", 32) // window)
        self.flat_pipes = self._pipes(count)
        for pipe in self.flat_pipes:
            await pipe.open()
        return self.flat_pipes

    async def flat_out_http(self, seconds: float) -> None:
        """As fast as the server answers, at the least cost to this process: ``connections``
        keep-alive connections, each with ``window`` pipelined requests in flight, a new one
        written from the callback of each answer (no task or future per request). Each
        connection has its own slice of the jobs, so a job's reports apply in order. Batch
        mode sends ``batch_size`` reports (one per job of the slice) per request."""
        config = self.config
        batch = config["mode"] == "batch"
        window = config.get("window", 2)
        size = config.get("batch_size", 100)
        # Burst: the next ``window`` requests are written together once the last answer of
        # the previous burst is in (fewer, larger reads and writes on both sides).
        burst = config.get("burst", False)
        pipes = self.flat_pipes or await self.open_flat_out()
        requests = RequestMaker(config)
        deadline = time.monotonic() + seconds
        done = asyncio.get_running_loop().create_future()
        running = len(pipes)
        publisher = self

        def drive(pipe: Pipe, mine: list[str]) -> None:
            turn = 0

            def next_request() -> bytes:
                nonlocal turn
                if batch:
                    start = turn * size
                    request = requests.batch(
                        [(mine[(start + k) % len(mine)], (start + k) // len(mine)) for k in range(size)]
                    )
                    publisher.sent += size
                else:
                    request = requests.single(mine[turn % len(mine)], turn // len(mine))
                    publisher.sent += 1
                turn += 1
                return request

            def answered(status: int, body: bytes) -> None:
                nonlocal running
                if status != 200:
                    key = f"HTTP {status}"
                    publisher.errors[key] = publisher.errors.get(key, 0) + 1
                elif batch:
                    publisher.applied += body.count(b'"applied":true')
                    failed = body.count(b'"error":')
                    if failed:
                        publisher.errors["batch item error"] = publisher.errors.get("batch item error", 0) + failed
                elif body.startswith(APPLIED):
                    publisher.applied += 1
                if burst and not pipe.idle:
                    return  # the rest of the burst is still on its way
                if time.monotonic() < deadline and not pipe.closed:
                    for _ in range(window if burst else 1):
                        pipe.send(next_request(), answered)
                elif pipe.idle:
                    running -= 1
                    if not running and not done.done():
                        done.set_result(None)

            for _ in range(window):
                pipe.send(next_request(), answered)

        jobs = self.jobs
        for k, pipe in enumerate(pipes):
            drive(pipe, jobs[k :: len(pipes)] or jobs)
        self.max_in_flight = window * len(pipes) * (size if batch else 1)
        try:
            await asyncio.wait_for(done, seconds + 60)
        except TimeoutError:
            self.errors["no answer"] = sum(len(p.waiting) for p in pipes)

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
    flat_http = not config.get("rate") and config["mode"] in ("http", "batch")
    if flat_http:
        await publisher.open_flat_out()
    else:
        write = await publisher.setup()
    emit("ready")
    while (await commands.get())["cmd"] != "go":
        pass
    cpu0, t0 = cpu_seconds(os.getpid()), time.monotonic()
    if config.get("rate"):
        await publisher.paced(write, config["rate"], config["seconds"])
    elif flat_http:
        await publisher.flat_out_http(config["seconds"])
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


APPLIED = b'{"applied":true'
Reply = Callable[[int, bytes], None] | asyncio.Future[tuple[int, bytes]]


class RequestMaker:
    """Pre-encoded request heads per path; each body carries ``message = "t=<send time>"``."""

    def __init__(self, config: dict[str, Any]) -> None:
        host = f"127.0.0.1:{config['port']}"
        self.head = (
            f"POST %s HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {config['token']}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        )
        self.heads: dict[str, bytes] = {}
        self.batch_head = (self.head % "/v1/progress").encode()

    def single(self, job: str, n: int) -> bytes:
        head = self.heads.get(job)
        if head is None:
            head = self.heads[job] = (self.head % f"/v1/jobs/{job}/progress").encode()
        body = b'{"phase":"GENERATING","phase_progress":%s,"message":"t=%.6f"}' % (
            repr(_progress(n)).encode(), time.time(),
        )
        return b"%s%d\r\n\r\n%s" % (head, len(body), body)

    def batch(self, reports: list[tuple[str, int]]) -> bytes:
        stamp = b"%.6f" % time.time()
        body = b'{"updates":[%s]}' % b",".join([
            b'{"job_id":"%s","phase":"GENERATING","phase_progress":%s,"message":"t=%s"}'
            % (job.encode(), repr(_progress(n)).encode(), stamp)
            for job, n in reports
        ])
        return b"%s%d\r\n\r\n%s" % (self.batch_head, len(body), body)


class Pipe(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with any number of pipelined requests in flight;
    answers are matched to requests in order. It reads only the status and Content-Length of
    each answer (the servers under test answer with Content-Length). httpx, or a stream
    reader per connection, costs tens of µs per request, enough to take the cores from the
    server under test; this costs a few."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting: collections.deque[Reply] = collections.deque()
        self.closed = False
        # Requests sent from answer callbacks go out together, in one write per read.
        self.outgoing: list[bytes] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, self.host, self.port)

    @property
    def idle(self) -> bool:
        return not self.waiting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, reply: Reply) -> None:
        assert self.transport is not None
        self.waiting.append(reply)
        if self.outgoing is not None:
            self.outgoing.append(request)
        else:
            self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.outgoing = []
        try:
            self._answers(data)
        finally:
            outgoing, self.outgoing = self.outgoing, None
            if outgoing and self.transport is not None:
                self.transport.write(b"".join(outgoing))

    def _answers(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        size = len(buffer)
        while True:
            end = buffer.find(b"\r\n\r\n", offset)
            if end < 0:
                break
            at = buffer.find(b"content-length:", offset, end)
            if at < 0:
                at = bytes(buffer[offset:end]).lower().find(b"content-length:")
                if at < 0:
                    raise ValueError("an answer without Content-Length")
                at += offset
            line_end = buffer.find(b"\r\n", at)
            length = int(buffer[at + 15 : line_end])
            start = end + 4
            if size < start + length:
                break
            status = int(buffer[offset + 9 : offset + 12])
            body = bytes(buffer[start : start + length])
            offset = start + length
            reply = self.waiting.popleft()
            if isinstance(reply, asyncio.Future):
                if not reply.done():
                    reply.set_result((status, body))
            else:
                reply(status, body)
        if offset:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiting, self.waiting = self.waiting, collections.deque()
        for reply in waiting:
            if isinstance(reply, asyncio.Future):
                if not reply.done():
                    reply.set_exception(ConnectionError("the server closed the connection"))
            else:
                reply(0, b"")

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _seq(body: bytes) -> int:
    at = body.index(b'"seq":') + 6
    end = at
    while body[end] in b"0123456789":
        end += 1
    return int(body[at:end])


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
