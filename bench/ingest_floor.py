"""The floor of HTTP progress ingest on this machine: the smallest servers that do the
irreducible work of a report, so every Phasecast ingest figure has them beside it.

``python -m bench.ingest_floor PORT REDIS_URL {asgi|raw|rawpipe}``

Work per request, and nothing else (no auth, no rules, no logging, no metrics):

- read the request and its body;
- parse the body as JSON (``json.loads``) and pick the job id (path or batch items);
- one Redis round trip through redis-py: ``EVALSHA`` of a trivial script that stores each
  report's progress under its job's key (a batch is one ``EVALSHA`` with every report);
- answer a pre-encoded 200 (a batch: one pre-encoded result per report).

Two servers:

- ``asgi``: uvicorn (httptools parser, uvloop) with a bare ASGI app: what any ASGI framework
  on uvicorn pays at least.
- ``raw``: an ``asyncio.Protocol`` on uvloop with httptools' parser and no ASGI at all;
  pipelined requests on a connection are answered in order by one task per burst.
- ``rawpipe``: ``raw`` with the EVALSHAs of one event-loop turn sent as one redis-py
  pipeline (one round trip shared by the reports of that turn), as Phasecast's engine does.

Routes: ``POST /v1/jobs/{id}/progress`` (single) and ``POST /v1/progress`` (batch
``{"updates":[{"job_id":…},…]}``); anything else is answered 404.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import deque
from typing import Any, cast

import httptools
import redis.asyncio as aioredis

SCRIPT = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i]) end return #KEYS"
PREFIX = "bench-floor:"
SINGLE = b'{"applied":true}'
ITEM = b'{"applied":true}'
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
JOBS = b"/v1/jobs/"
SUFFIX = b"/progress"
BATCH = b"/v1/progress"


class Store:
    def __init__(self, url: str, pipelined: bool = False) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.sha = ""
        # ``rawpipe``: the EVALSHAs of one event-loop turn go out in one redis-py pipeline
        # (one round trip for all of them), as Phasecast's Redis engine sends its writes.
        self.pipelined = pipelined
        self.queue: list[tuple[list[str], list[str], asyncio.Future[Any]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def evalsha(self, keys: list[str], values: list[str]) -> Any:
        if not self.pipelined:
            return await self.client.evalsha(self.sha, len(keys), *keys, *values)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((keys, values, future))
        if self.flusher is None:
            self.flusher = asyncio.get_running_loop().create_task(self.flush())
        return await future

    async def flush(self) -> None:
        try:
            while self.queue:
                await asyncio.sleep(0)  # the rest of this loop turn's requests
                batch, self.queue = self.queue, []
                async with self.client.pipeline(transaction=False) as pipe:
                    for keys, values, _ in batch:
                        pipe.evalsha(self.sha, len(keys), *keys, *values)
                    results = await pipe.execute()
                for (_, _, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
        finally:
            self.flusher = None

    async def start(self) -> None:
        self.sha = await self.client.script_load(SCRIPT)

    async def handle(self, path: bytes, body: bytes) -> bytes | None:
        """The reply body for one request, or None for an unknown path."""
        if path.startswith(JOBS) and path.endswith(SUFFIX):
            data = json.loads(body)
            job = path[len(JOBS) : -len(SUFFIX)].decode()
            await self.evalsha([PREFIX + job], [str(data.get("phase_progress"))])
            return SINGLE
        if path == BATCH:
            items = json.loads(body)["updates"]
            keys = [PREFIX + item["job_id"] for item in items]
            values = [str(item.get("phase_progress")) for item in items]
            await self.evalsha(keys, values)
            return b'{"results":[' + b",".join([ITEM] * len(items)) + b"]}"
        return None


# --- uvicorn + a bare ASGI app ---------------------------------------------------------


def asgi_app(store: Store) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await store.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        reply = await store.handle(scope["raw_path"], b"".join(chunks))
        if reply is None:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(reply))],
        })
        await send({"type": "http.response.body", "body": reply})

    return app


# --- a raw asyncio Protocol ------------------------------------------------------------


class RawHTTP(asyncio.Protocol):
    """HTTP/1.1 keep-alive with pipelining: requests are answered in order."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.append((self.url, b"".join(self.body)))
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self.answer())

    async def answer(self) -> None:
        transport = self.transport
        assert transport is not None
        queue = self.queue
        try:
            while queue:
                path, body = queue.popleft()
                reply = await self.store.handle(path, body)
                if transport.is_closing():
                    return
                transport.write(NOT_FOUND if reply is None else HEAD % len(reply) + reply)
        finally:
            self.worker = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.clear()


async def serve_raw(port: int, store: Store) -> None:
    await store.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RawHTTP(store), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, redis_url, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    store = Store(redis_url, pipelined=kind == "rawpipe")
    if kind == "asgi":
        import uvicorn

        uvicorn.run(
            asgi_app(store), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
            lifespan="on", access_log=False, log_level="warning",
        )
        return
    import uvloop

    uvloop.run(serve_raw(port, store))


if __name__ == "__main__":
    main()


def system(name: str, redis: Any) -> Any:
    """``floor-asgi``, ``floor-raw`` or ``floor-rawpipe`` on ``redis`` (a ``PrivateRedis``), as a bench system."""
    import contextlib
    import subprocess
    import uuid

    from tests.support.process import free_port, wait_for_port

    from bench.common import stop_process
    from bench.control import child_env
    from bench.systems import System

    @contextlib.contextmanager
    def running() -> Any:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.ingest_floor", str(port), redis.url, name.removeprefix("floor-")],
            env=child_env(),
        )
        try:
            wait_for_port(port, 30, process)
            yield System(
                name, "redis", port, process.pid, redis_url=redis.url,
                redis_pid=redis.process.pid if redis.process else None,
                channel=f"bench-{name}-{uuid.uuid4().hex[:8]}",
            )
        finally:
            stop_process(process)

    return running()
