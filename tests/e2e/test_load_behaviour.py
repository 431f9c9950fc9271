"""Behaviour under pressure: a watcher that stops reading, and cleanup after clients leave."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import websockets
from tests.conftest import WS_TRANSPORTS
from tests.support.clients import WSWatcher, sse_events
from tests.support.process import ServerProcess

from phasecast.engines import open_engine
from phasecast.model import Phase
from phasecast.tracker import ProgressTracker

UPDATES = 10_000


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


@pytest.fixture(params=WS_TRANSPORTS)
def ws_transport(request: pytest.FixtureRequest) -> str:
    transport: str = request.param
    return transport


@pytest.fixture
def server(ws_transport: str, engine_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server on each engine, once per WebSocket transport."""
    env = {"PHASECAST_PING_INTERVAL": "1", "PHASECAST_WS_TRANSPORT": ws_transport}
    with ServerProcess(engine_url, env=env, log_path=tmp_path / "server.log") as process:
        yield process


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)  # 10,000 writes one after another: long on a busy machine
async def test_a_watcher_that_stops_reading_costs_bounded_memory_and_then_gets_the_latest(
    redis_engine_url: str, tmp_path: Path, make_token: Callable[..., str], ws_transport: str
) -> None:
    # Large states (about 10 KB each) make an unbounded queue impossible to miss:
    # 10,000 of them would be about 100 MB.
    metadata = {"notes": "x" * 10_000}
    env = {"PHASECAST_WS_TRANSPORT": ws_transport}
    with ServerProcess(redis_engine_url, env=env, log_path=tmp_path / "server.log") as server:
        async with ProgressTracker(open_engine(redis_engine_url)) as writer:
            await writer.create(owner="alice", job_id="big", metadata=metadata)
            url = f"{server.ws_url}/v1/ws?access_token={quote(make_token('alice'))}"
            # max_queue=1: the client library stops reading the socket as soon as one message
            # is waiting, so TCP pushes back on the server just as a stalled browser would.
            # No compression, so the states really are 10 KB on the wire.
            # No client keepalive either: a client that does not read cannot read the Pong to
            # its own Ping, and would hang up on itself when the stall lasts long.
            async with websockets.connect(
                url, max_queue=1, max_size=2**20, compression=None, ping_interval=None
            ) as stalled:
                assert json.loads(await stalled.recv())["type"] == "authenticated"
                await stalled.send(json.dumps({"op": "subscribe", "job_id": "big"}))
                assert json.loads(await stalled.recv())["type"] == "subscribed"
                first = json.loads(await stalled.recv())
                assert first["job"]["seq"] == 1
                baseline = rss_kib(server.pid)

                for index in range(1, UPDATES + 1):
                    await writer.report("big", Phase.GENERATING, message=f"update {index}")
                final_seq = UPDATES + 1
                grown = rss_kib(server.pid) - baseline

                # Reading again: everything that was squeezed into socket buffers drains, then
                # the newest state arrives; nothing in between is owed.
                received: list[int] = []
                async with asyncio.timeout(30):
                    while not received or received[-1] < final_seq:
                        message = json.loads(await stalled.recv())
                        if message["type"] == "state":
                            received.append(message["job"]["seq"])
            # The skipped states are counted once the watcher leaves.
            conflated = 0.0
            async with httpx.AsyncClient(base_url=server.url) as api:
                for _ in range(200):
                    text = (await api.get("/metrics")).text
                    conflated = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                    if line.startswith("phasecast_messages_conflated_total "))
                    if conflated:
                        break
                    await asyncio.sleep(0.05)
        print(f"server RSS growth while stalled: {grown} KiB; states delivered: {len(received)} of {UPDATES}")
        assert received == sorted(set(received))
        assert received[-1] == final_seq
        assert len(received) < UPDATES / 2  # conflated, not queued
        assert conflated > UPDATES / 2
        assert grown < 40 * 1024, f"server grew {grown} KiB while a watcher stalled"


async def test_watchers_and_subscriptions_are_released(
    server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    def gauge(text: str, name: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as api:
        for job_id in ("a", "b"):
            await api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})
        viewer = make_token("alice")
        sockets = [await WSWatcher(server.url, viewer).connect() for _ in range(3)]
        for watcher in sockets:
            await watcher.subscribe("a")
            await watcher.subscribe("b")
            await watcher.wait_seq("a", 1)
            await watcher.wait_seq("b", 1)
        sse_started = asyncio.Event()

        async def sse_reader() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                async for _ in sse_events(client, f"/v1/jobs/b/events?access_token={viewer}"):
                    sse_started.set()

        sse_task = asyncio.create_task(sse_reader())
        await asyncio.wait_for(sse_started.wait(), 5)
        busy = (await api.get("/metrics")).text
        assert gauge(busy, "phasecast_watchers") == 7
        assert gauge(busy, "phasecast_watched_jobs") == 2
        assert gauge(busy, "phasecast_connections") == 4

        # Job a ends: its subscriptions end with it. Clients of b leave: theirs go too.
        await api.post("/v1/jobs/a/complete", json={})
        for watcher in sockets:
            await watcher.wait_terminal("a")
        sse_task.cancel()
        await asyncio.gather(sse_task, return_exceptions=True)
        for watcher in sockets:
            await watcher.close()

        async def released() -> bool:
            text = (await api.get("/metrics")).text
            return all(gauge(text, n) == 0 for n in ("phasecast_watchers", "phasecast_watched_jobs", "phasecast_connections"))

        # The server notices each departure when its socket closes; poll the gauges until
        # they settle (bounded), since there is no event to await from outside the process.
        for _ in range(200):
            if await released():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("watchers, watched jobs or connections did not return to zero in 10 s")
