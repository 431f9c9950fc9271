"""Load generator process: N watchers spread over M jobs, each on its own connection.

Run by the orchestrator as ``python -m bench.loadgen '<json config>'``. It connects every
watcher, reports ``ready``, then on ``measure`` starts counting: latency from the state's
``updated_at`` to receipt, messages, per-job seq gaps and reorderings. ``expect`` gives each
job's final seq (for the reconnect storm: report when every watcher has it); ``stop`` makes
it report ``result`` and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

from bench.common import BUCKET_US, TimeParser, cpu_seconds, run_child
from bench.control import command_queue, emit
from bench.rawclient import SSEClient, WebSocketClient

MAX_RECONNECT_ATTEMPTS = 200
JOBS_PER_STREAM = 10  # transport "ssemux": one GET /v1/events stream per 10 watchers
INITIAL_CONNECT_ATTEMPTS = 10
RECONNECT_CAP_SECONDS = 2.0


class Stats:
    """Everything counted across the watchers of this process."""

    def __init__(self) -> None:
        self.measuring = False
        self.latency: Counter[int] = Counter()
        self.e2e: Counter[int] = Counter()  # from the publisher's send time, when it sent one
        self.messages = 0
        self.gaps = 0
        self.out_of_order = 0
        self.errors: Counter[str] = Counter()
        self.parse = TimeParser()
        self.expected: dict[str, int] | None = None
        self.synced = 0
        self.all_synced = asyncio.Event()
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.watchers = 0
        self.reconnects = 0
        self.connect_retries = 0


class Watcher:
    __slots__ = (
        "attempts",
        "client",
        "first_seq",
        "gen",
        "index",
        "job",
        "last_seq",
        "ready",
        "stats",
        "stopping",
        "synced",
    )

    def __init__(self, gen: LoadGen, job: str) -> None:
        self.gen = gen
        self.stats = gen.stats
        self.job = job
        self.last_seq = 0
        self.first_seq = 0
        self.ready = False
        self.synced = False
        self.attempts = 0
        self.index = 0
        self.stopping = False
        self.client: WebSocketClient | SSEClient | None = None

    # --- receiving -----------------------------------------------------------------------

    def on_state(self, seq: int, updated_at: str, message: str, now: float) -> None:
        stats = self.stats
        last = self.last_seq
        if not self.ready:
            self.ready = True
            self.first_seq = seq
            stats.ready += 1
            if stats.ready == stats.watchers:
                stats.all_ready.set()
        elif seq <= last:
            stats.out_of_order += 1
            return
        elif seq > last + 1 and last:
            stats.gaps += seq - last - 1
        self.last_seq = seq
        if stats.measuring:
            stats.messages += 1
            stats.latency[max(0, int((now - stats.parse(updated_at)) * 1e6)) // BUCKET_US] += 1
            if message.startswith("t="):
                stats.e2e[max(0, int((now - float(message[2:])) * 1e6)) // BUCKET_US] += 1
        expected = stats.expected
        if expected is not None and not self.synced and seq >= expected.get(self.job, 1 << 62):
            self.synced = True
            stats.synced += 1
            if stats.synced == stats.watchers:
                stats.all_synced.set()

    def on_ready_without_state(self) -> None:
        """Socket.IO rooms have no stored state: the join acknowledgement makes it ready."""
        if not self.ready:
            self.ready = True
            self.stats.ready += 1
            if self.stats.ready == self.stats.watchers:
                self.stats.all_ready.set()

    def on_close(self, code: int | None) -> None:
        self.client = None
        if self.gen.reconnect and not self.stopping:
            self.stats.reconnects += 1
            asyncio.get_running_loop().create_task(self.gen.reconnect_later(self))


class LoadGen:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.transport: str = config["transport"]
        self.host: str = config.get("host", "127.0.0.1")
        self.port: int = config["port"]
        self.token: str = config.get("token", "")
        self.reconnect: bool = config.get("reconnect", False)
        self.stats = Stats()
        jobs: list[str] = config["jobs"]
        offset: int = config.get("offset", 0)
        self.watchers = [Watcher(self, jobs[(offset + i) % len(jobs)]) for i in range(config["watchers"])]
        for i, watcher in enumerate(self.watchers):
            watcher.index = i
        self.source_addresses: list[str] = config.get("source_addresses") or []
        # "ssemux": consecutive watchers (distinct jobs) share one multiplexed stream, opened
        # by the first of them; the others are its followers.
        self.groups: dict[Watcher, list[Watcher]] = {}
        if self.transport == "ssemux":
            for start in range(0, len(self.watchers), JOBS_PER_STREAM):
                group = self.watchers[start : start + JOBS_PER_STREAM]
                self.groups[group[0]] = group
        self.stats.watchers = len(self.watchers)
        self.limit = asyncio.Semaphore(config.get("connect_concurrency", 50))

    # --- connecting ----------------------------------------------------------------------

    async def connect(self, watcher: Watcher, *, limited: bool = True) -> None:
        """Open the watcher's connection and subscribe. The first connections of a run are
        paced (``connect_concurrency`` at a time) to set the run up; a reconnect is not:
        real clients do not queue behind each other, so after a restart they all arrive at
        their own (jittered) times, and the server's accept queue takes what comes."""
        async with self.limit if limited else contextlib.nullcontext():
            await self._open(watcher)
        if self.transport == "ws":
            client = watcher.client
            assert isinstance(client, WebSocketClient)
            request: dict[str, Any] = {"op": "subscribe", "job_id": watcher.job}
            if watcher.last_seq:
                request["since"] = watcher.last_seq
            client.send_text(json.dumps(request))

    async def _open(self, watcher: Watcher) -> None:
        loop = asyncio.get_running_loop()
        authority = f"{self.host}:{self.port}"
        if self.transport == "ws":
            path = f"/v1/ws?access_token={quote(self.token)}"
            client: WebSocketClient | SSEClient = WebSocketClient(
                authority, path, lambda text: self._ws_text(watcher, text), watcher.on_close
            )
        elif self.transport == "sio":
            path = "/socket.io/?EIO=4&transport=websocket"
            client = WebSocketClient(
                authority, path, lambda text: self._sio_text(watcher, text), watcher.on_close
            )
        elif self.transport == "ssemux":
            group = self.groups[watcher]
            by_job = {member.job: member for member in group}
            jobs = "".join(f"&job={quote(member.job)}" for member in group)
            path = f"/v1/events?access_token={quote(self.token)}{jobs}"
            client = SSEClient(
                authority, path, {}, lambda text: self._ssemux_text(by_job, text), watcher.on_close
            )
        else:
            since = f"&since={watcher.last_seq}" if watcher.last_seq else ""
            path = f"/v1/jobs/{watcher.job}/events?access_token={quote(self.token)}{since}"
            client = SSEClient(
                authority, path, {}, lambda text: self._sse_text(watcher, text), watcher.on_close
            )
        sources = self.source_addresses
        local = (sources[watcher.index % len(sources)], 0) if sources else None
        await loop.create_connection(lambda: client, self.host, self.port, local_addr=local)
        watcher.client = client
        await asyncio.wait_for(client.open, 30)

    async def reconnect_later(self, watcher: Watcher) -> None:
        while not watcher.stopping and watcher.attempts < MAX_RECONNECT_ATTEMPTS:
            # Capped exponential backoff with full jitter, as a browser client would do.
            delay = random.uniform(0, min(RECONNECT_CAP_SECONDS, 0.05 * 2 ** min(watcher.attempts, 8)))
            watcher.attempts += 1
            await asyncio.sleep(delay)
            try:
                await self.connect(watcher, limited=False)
            except (OSError, TimeoutError, ConnectionError):
                continue
            watcher.attempts = 0
            return

    async def subscribe_redis(self) -> None:
        """The floor: one plain Redis subscriber connection for all jobs, one watcher a job."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.config["redis_url"])
        pubsub = client.pubsub()
        prefix = self.config["channel"]
        by_channel = {f"{prefix}:{w.job}".encode(): w for w in self.watchers}
        await pubsub.subscribe(*by_channel)
        for watcher in self.watchers:
            watcher.on_ready_without_state()

        async def pump() -> None:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message["type"] != "message":
                    continue
                now = time.time()
                job = json.loads(message["data"])
                by_channel[message["channel"]].on_state(job["seq"], job["updated_at"], job["message"], now)

        self._pump = asyncio.get_running_loop().create_task(pump())

    async def connect_first(self, watcher: Watcher) -> None:
        """The first connection, retried a few times: a server answering 503 to a burst of
        connections (its engine was momentarily out of connections) is retried the way a
        client library would, and counted in ``connect_retries``."""
        for attempt in range(INITIAL_CONNECT_ATTEMPTS):
            try:
                await self.connect(watcher)
                return
            except ConnectionError:
                if attempt == INITIAL_CONNECT_ATTEMPTS - 1:
                    raise
                self.stats.connect_retries += 1
                await asyncio.sleep(random.uniform(0.1, 1.0))

    async def connect_all(self) -> dict[str, Any]:
        started = time.monotonic()
        if self.transport == "redis":
            await self.subscribe_redis()
            return {
                "connect_seconds": 0.0,
                "ready_seconds": 0.0,
                "failed": 0,
                "failure_sample": [],
                "ready": self.stats.ready,
            }
        leaders = list(self.groups) if self.transport == "ssemux" else self.watchers
        results = await asyncio.gather(
            *(self.connect_first(w) for w in leaders), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        connected = time.monotonic() - started
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stats.all_ready.wait(), 20 + len(self.watchers) / 200)
        return {
            "connect_seconds": round(connected, 3),
            "ready_seconds": round(time.monotonic() - started, 3),
            "failed": len(failures),
            "failure_sample": [repr(f) for f in failures[:3]],
            "connect_retries": self.stats.connect_retries,
            "ready": self.stats.ready,
        }

    # --- message parsing per transport ---------------------------------------------------

    def _ws_text(self, watcher: Watcher, text: str) -> None:
        now = time.time()
        if text.startswith('{"type":"state"'):
            job = json.loads(text)["job"]
            watcher.on_state(job["seq"], job["updated_at"], job["message"], now)
        elif text.startswith('{"type":"error"'):
            code = json.loads(text).get("code", "?")
            self.stats.errors[code] += 1
            if code == "unavailable" and watcher.attempts < MAX_RECONNECT_ATTEMPTS:
                # The server could not reach its engine for this subscribe: retry, as a
                # browser client would, rather than counting the watcher as lost.
                watcher.attempts += 1
                asyncio.get_running_loop().call_later(random.uniform(0.1, 1.0), self._resubscribe, watcher)

    def _resubscribe(self, watcher: Watcher) -> None:
        client = watcher.client
        if isinstance(client, WebSocketClient) and not watcher.stopping:
            request: dict[str, Any] = {"op": "subscribe", "job_id": watcher.job}
            if watcher.last_seq:
                request["since"] = watcher.last_seq
            client.send_text(json.dumps(request))

    def _sse_text(self, watcher: Watcher, text: str) -> None:
        now = time.time()
        job = json.loads(text)
        watcher.on_state(job["seq"], job["updated_at"], job["message"], now)

    def _ssemux_text(self, by_job: dict[str, Watcher], text: str) -> None:
        now = time.time()
        job = json.loads(text)
        watcher = by_job.get(job.get("job_id", ""))
        if watcher is not None:
            watcher.on_state(job["seq"], job["updated_at"], job["message"], now)

    def _sio_text(self, watcher: Watcher, text: str) -> None:
        now = time.time()
        client = watcher.client
        if text.startswith("42"):
            name, data = json.loads(text[2:])[:2]
            if name == "state":
                watcher.on_state(data["seq"], data["updated_at"], data["message"], now)
            elif name == "subscribed":
                watcher.on_ready_without_state()
        elif text == "2" and client is not None:  # Engine.IO ping: answer or be dropped
            assert isinstance(client, WebSocketClient)
            client.send_text("3")
        elif text.startswith("0{") and client is not None:
            assert isinstance(client, WebSocketClient)
            client.send_text("40")
        elif text.startswith("40") and client is not None:
            assert isinstance(client, WebSocketClient)
            client.send_text(json.dumps(["subscribe", watcher.job]).join(("42", "")))

    # --- results -------------------------------------------------------------------------

    def result(self, final: dict[str, int] | None) -> dict[str, Any]:
        stats = self.stats
        tail_missing = 0
        behind = 0
        if final:
            for watcher in self.watchers:
                target = final.get(watcher.job)
                if target is not None and watcher.last_seq < target:
                    tail_missing += target - watcher.last_seq
                    behind += 1
        return {
            "watchers": len(self.watchers),
            "messages": stats.messages,
            "latency_hist": dict(stats.latency),
            "e2e_hist": dict(stats.e2e),
            "gaps": stats.gaps,
            "tail_missing": tail_missing,
            "watchers_behind": behind,
            "out_of_order": stats.out_of_order,
            "errors": dict(stats.errors),
            "reconnects": stats.reconnects,
            "open": sum(1 for w in self.watchers if w.client is not None),
        }


async def run(config: dict[str, Any]) -> None:
    gen = LoadGen(config)
    commands = command_queue()
    emit("ready", **await gen.connect_all())
    final: dict[str, int] | None = None
    while True:
        command = await commands.get()
        name = command["cmd"]
        if name == "measure":
            gen.stats.measuring = True
            emit("measuring")
        elif name == "expect":
            final = command["seqs"]
            gen.stats.expected = final
            for watcher in gen.watchers:  # some may have it already
                if not watcher.synced and watcher.last_seq >= final.get(watcher.job, 1 << 62):
                    watcher.synced = True
                    gen.stats.synced += 1
            if gen.stats.synced >= gen.stats.watchers:
                gen.stats.all_synced.set()
            asyncio.get_running_loop().create_task(_report_synced(gen, command.get("timeout", 60)))
        elif name == "final":
            final = command["seqs"]
        elif name == "stop":
            final = command.get("seqs", final)
            gen.stats.measuring = False
            for watcher in gen.watchers:
                watcher.stopping = True
            emit("result", cpu_seconds=cpu_seconds_self(), **gen.result(final))
            for watcher in gen.watchers:
                if watcher.client is not None:
                    watcher.client.close()
            await asyncio.sleep(0.2)
            return


async def _report_synced(gen: LoadGen, timeout: float) -> None:
    try:
        await asyncio.wait_for(gen.stats.all_synced.wait(), timeout)
        emit("synced", at=time.time(), synced=gen.stats.synced)
    except TimeoutError:
        emit("synced", at=None, synced=gen.stats.synced)


def cpu_seconds_self() -> float:
    import os

    return cpu_seconds(os.getpid())


def main() -> None:
    run_child(run)


if __name__ == "__main__":
    main()
