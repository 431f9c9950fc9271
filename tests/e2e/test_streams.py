"""A real server on each engine, watched over real WebSocket and SSE connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import WS_TRANSPORTS
from tests.support.clients import SSEEvent, WSWatcher, sse_events
from tests.support.process import ServerProcess

from phasecast.model import parse_time


@pytest.fixture(params=WS_TRANSPORTS)
def server(request: pytest.FixtureRequest, engine_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server on each engine, once per WebSocket transport."""
    env = {"PHASECAST_PING_INTERVAL": "1", "PHASECAST_WS_TRANSPORT": request.param}
    with ServerProcess(engine_url, env=env, log_path=tmp_path / "server.log") as process:
        yield process


# Every report a comic backend makes, in order: each one is a change a viewer must see.
SCRIPT: list[dict[str, Any]] = [
    {"phase": "ANALYZING", "phase_progress": 30, "message": "Reading the story"},
    {"phase": "ANALYZING", "phase_progress": 100, "message": "Story analysed"},
    *(
        {"phase": "GENERATING", "step": f"panel-{n}", "step_progress": p, "steps_total": 3}
        for n in (1, 2, 3)
        for p in (50, 100)
    ),
    {"phase": "POST_PROCESSING", "phase_progress": 50, "message": "Lettering"},
    {"phase": "POST_PROCESSING", "phase_progress": 100},
]


async def test_websocket_and_sse_watchers_receive_the_same_states(
    server: ServerProcess,
    make_token: Callable[..., str],
    worker_token: str,
    record_latency: Callable[[str, float], None],
) -> None:
    engine = server.engine.split(":", 1)[0]
    worker = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=worker) as api:
        created = await api.post("/v1/jobs", json={"job_id": "comic-1", "owner": "alice"})
        assert created.status_code == 201, created.text

        viewer = make_token("alice")
        ws = await WSWatcher(server.url, viewer).connect()
        await ws.subscribe("comic-1")
        await ws.wait_seq("comic-1", 1)

        sse_states: list[SSEEvent] = []
        sse_progress = asyncio.Condition()

        async def read_sse() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                url = f"{server.url}/v1/jobs/comic-1/events?access_token={viewer}"
                async for event in sse_events(client, url):
                    if isinstance(event, SSEEvent):
                        async with sse_progress:
                            sse_states.append(event)
                            sse_progress.notify_all()

        sse_task = asyncio.create_task(read_sse())

        async def sse_seq(seq: int) -> None:
            async with asyncio.timeout(10), sse_progress:
                await sse_progress.wait_for(lambda: bool(sse_states) and _seq_of(sse_states[-1]) >= seq)

        await sse_seq(1)
        expected_seq = 1
        # One report at a time, each awaited on both streams: the two must see every change.
        for report in [*SCRIPT, None]:
            if report is None:
                reply = await api.post("/v1/jobs/comic-1/complete", json={"message": "Ready"})
            else:
                reply = await api.post("/v1/jobs/comic-1/progress", json=report)
            assert reply.status_code == 200, reply.text
            assert reply.json()["applied"] is True
            expected_seq += 1
            received = await ws.wait_seq("comic-1", expected_seq)
            record_latency(f"websocket/{engine}", received.latency)
            await sse_seq(expected_seq)
            latest = sse_states[-1]
            sse_latency = latest.received_at - parse_time(latest.json()["updated_at"]).timestamp()
            record_latency(f"sse/{engine}", sse_latency)

        await asyncio.wait_for(sse_task, 10)  # the SSE stream ends after the terminal state
        ws_states = [r.state for r in ws.states["comic-1"]]
        sse_json = [e.json() for e in sse_states]
        assert ws_states == sse_json
        assert [e.event for e in sse_states] == ["state"] * len(sse_states)
        assert [_seq_of(e) for e in sse_states] == list(range(1, expected_seq + 1))
        # The id is the seq and its epoch, so a resume after a store loss is recognised.
        assert all(e.id == f"{e.json()['seq']}.{e.json()['epoch']}" for e in sse_states)
        for state in ws_states:
            assert {"phase", "phase_progress", "progress"} <= state.keys()
        phases = [s["phase"] for s in ws_states]
        assert list(dict.fromkeys(phases)) == [
            "QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"
        ]
        progress = [s["progress"] for s in ws_states]
        assert progress == sorted(progress)
        assert ws_states[-1]["progress"] == 100.0
        # Only COMPLETE is 100: POST_PROCESSING at 100 stops just below.
        assert [s["progress"] for s in ws_states if s["phase"] == "POST_PROCESSING"] == [90.0, 99.9]
        assert all(s["progress"] < 100 for s in ws_states[:-1])
        # Entering a phase without a message shows the phase's default, not the last message.
        messages = {s["phase"]: s["message"] for s in reversed(ws_states)}  # first per phase
        assert messages["GENERATING"] == "Generating"
        assert messages["POST_PROCESSING"] == "Lettering"
        assert ws_states[4]["steps"]["panel-1"] == {"progress": 100.0, "status": "done"}
        await ws.close()


def _seq_of(event: SSEEvent) -> int:
    """The seq of a per-job stream's event id (``<seq>.<epoch>``)."""
    return int((event.id or "0").split(".")[0])
