"""The demo page in real Chromium against a real ``phasecast demo`` server.

Each test watches comic generations the way a person would, through the page, and reads
what the page received from ``window.__phasecast`` (every accepted update with its seq,
phase, progress, transport and timing) and ``window.__bars`` (every value the overall
progress bars displayed). Waits are on page or server conditions, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from browser_support import ARTIFACTS, FAST_RECOVERY, DemoServer, save_json
from playwright.async_api import BrowserContext, Page, WebSocketRoute
from websockets.asyncio.client import connect

pytestmark = pytest.mark.browser

PIPELINE = ["QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]
RANK = {phase: index for index, phase in enumerate(PIPELINE)}
Update = dict[str, Any]


# ---- driving the page --------------------------------------------------------------------


async def open_demo(page: Page, server: DemoServer, query: str = FAST_RECOVERY) -> None:
    await page.goto(f"{server.url}/{query}")
    await page.wait_for_function("() => window.__phasecast !== undefined")
    await page.get_by_role("button", name="Start a comic").wait_for()


async def start_generation(page: Page, panels: int = 6) -> str:
    await page.get_by_role("spinbutton", name="Panels").fill(str(panels))
    async with page.expect_response(re.compile(r"/v1/demo/generations$")) as created:
        await page.get_by_role("button", name="Start a comic").click()
    response = await created.value
    assert response.status == 201, await response.text()
    job_id: str = (await response.json())["job_id"]
    await page.locator(f'[data-job-id="{job_id}"]').wait_for()
    return job_id


async def wait_phase(page: Page, job_id: str, phase: str, timeout: float = 60_000) -> None:
    await page.wait_for_function(
        '([id, phase]) => document.querySelector(`[data-job-id="${id}"]`)?.dataset.phase === phase',
        arg=[job_id, phase],
        timeout=timeout,
    )


async def wait_progress_above(page: Page, job_id: str, percent: float, timeout: float = 60_000) -> None:
    await page.wait_for_function(
        """([id, percent]) => {
            const mine = window.__phasecast.updates.filter((u) => u.job_id === id);
            return mine.length > 0 && mine[mine.length - 1].progress > percent;
        }""",
        arg=[job_id, percent],
        timeout=timeout,
    )


async def updates_for(page: Page, job_id: str) -> list[Update]:
    updates: list[Update] = await page.evaluate(
        "(id) => window.__phasecast.updates.filter((u) => u.job_id === id)", job_id
    )
    return updates


async def last_seq(page: Page, job_id: str) -> int:
    updates = await updates_for(page, job_id)
    return int(updates[-1]["seq"]) if updates else 0


async def displayed_bars(page: Page, job_id: str) -> list[float]:
    values: list[float] = await page.evaluate("(id) => window.__bars[id] || []", job_id)
    return values


# ---- checks ------------------------------------------------------------------------------


def assert_never_backwards(updates: list[Update]) -> None:
    """seq strictly up, progress and phase never down: the client's one promise."""
    assert updates, "the page received no update"
    for before, after in itertools.pairwise(updates):
        assert after["seq"] > before["seq"], f"seq went from {before['seq']} to {after['seq']}"
        assert after["progress"] >= before["progress"], f"progress went back: {before} -> {after}"
        assert RANK.get(after["phase"], 99) >= RANK.get(before["phase"], 99), (
            f"phase went back: {before} -> {after}"
        )


def phases_in_order(updates: list[Update]) -> list[str]:
    seen: list[str] = []
    for update in updates:
        if not seen or seen[-1] != update["phase"]:
            seen.append(update["phase"])
    return seen


async def assert_finished_display(page: Page, job_id: str) -> None:
    tracker = page.locator(f'[data-job-id="{job_id}"]')
    bar = tracker.get_by_role("progressbar", name="Overall progress")
    assert await bar.get_attribute("aria-valuenow") == "100"
    statuses = await tracker.locator(".pc-phase").evaluate_all(
        "(items) => items.map((i) => i.dataset.status)"
    )
    assert statuses == ["done"] * 5, statuses
    bars = await displayed_bars(page, job_id)
    assert bars == sorted(bars), f"the progress bar went backwards: {bars}"
    assert bars[-1] == 100


# ---- a second watcher on the test's side -----------------------------------------------


class ServerWatcher:
    """Watches one job over its own WebSocket, so a test can await what the server has
    reached independently of the browser."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self.changed = asyncio.Event()

    async def run(self, server: DemoServer, job_id: str) -> None:
        url = f"ws://127.0.0.1:{server.port}/v1/ws?access_token={server.token()}"
        async with connect(url) as socket:
            await socket.send(json.dumps({"op": "subscribe", "job_id": job_id}))
            async for raw in socket:
                message = json.loads(raw)
                if message.get("type") == "state":
                    self.state = message["job"]
                    self.changed.set()

    async def wait_for(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while self.state is None or not condition(self.state):
                self.changed.clear()
                await self.changed.wait()
        assert self.state is not None
        return self.state


@contextlib.asynccontextmanager
async def server_watcher(server: DemoServer, job_id: str) -> AsyncIterator[ServerWatcher]:
    watcher = ServerWatcher()
    task = asyncio.create_task(watcher.run(server, job_id))
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- the scenarios ---------------------------------------------------------------------


async def test_full_generation_shows_every_phase_in_order(page: Page, demo_server: DemoServer) -> None:
    await open_demo(page, demo_server)
    job_id = await start_generation(page, panels=6)
    tracker = page.locator(f'[data-job-id="{job_id}"]')

    # While drawing, the tracker shows one mini bar per panel.
    await page.wait_for_function(
        """(id) => {
            const t = document.querySelector(`[data-job-id="${id}"]`);
            return t?.dataset.phase === 'GENERATING' && t.querySelectorAll('.pc-step [role=progressbar]').length === 6;
        }""",
        arg=job_id,
    )
    await wait_phase(page, job_id, "COMPLETE")

    updates = await updates_for(page, job_id)
    assert_never_backwards(updates)
    seen = phases_in_order(updates)
    assert seen[-4:] == ["ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"], seen
    assert seen[0] in ("QUEUED", "ANALYZING"), seen
    assert max(u["stepsTotal"] or 0 for u in updates) == 6
    assert updates[-1]["progress"] == 100
    await assert_finished_display(page, job_id)
    assert await tracker.locator(".pc-tracker__message").inner_text() == demo_server.job(job_id)["message"]
    assert {u["transport"] for u in updates} == {"websocket"}


async def test_page_recovers_from_a_server_restart(page: Page, slow_demo_server: DemoServer) -> None:
    server = slow_demo_server
    await open_demo(page, server)
    job_id = await start_generation(page, panels=6)
    await wait_phase(page, job_id, "GENERATING")
    await wait_progress_above(page, job_id, 20)
    before_kill = (await updates_for(page, job_id))[-1]

    server.kill()
    await page.wait_for_function("() => window.__phasecast.status !== 'open'")
    restarted_at = time.time() * 1000
    server.start()

    # The page reconnects by itself: no reload, no click.
    await wait_progress_above(page, job_id, before_kill["progress"])
    await wait_phase(page, job_id, "COMPLETE", timeout=90_000)

    updates = await updates_for(page, job_id)
    assert_never_backwards(updates)
    await assert_finished_display(page, job_id)
    after = [u for u in updates if u["receivedAt"] > restarted_at]
    assert after, "no update arrived after the restart"
    assert "websocket" in {u["transport"] for u in after}, f"never moved back to the WebSocket: {after}"
    statuses = await page.evaluate("window.__phasecast.connections.map((c) => c.status)")
    assert "reconnecting" in statuses or "fallback" in statuses, statuses


async def test_page_catches_up_after_the_browser_was_offline(
    page: Page, context: BrowserContext, slow_demo_server: DemoServer
) -> None:
    server = slow_demo_server
    await open_demo(page, server)
    job_id = await start_generation(page, panels=6)
    await wait_phase(page, job_id, "ANALYZING")

    async with server_watcher(server, job_id) as watcher:
        await context.set_offline(True)
        await page.wait_for_function("() => navigator.onLine === false")
        seq_when_cut = await last_seq(page, job_id)
        # The server moves on without the page.
        server_state = await watcher.wait_for(lambda state: state["seq"] >= seq_when_cut + 4)
        assert await last_seq(page, job_id) < server_state["seq"], "the page kept receiving while offline"

        await context.set_offline(False)
        await page.wait_for_function(
            "([id, seq]) => window.__phasecast.updates.some((u) => u.job_id === id && u.seq >= seq)",
            arg=[job_id, server_state["seq"]],
        )
        await wait_phase(page, job_id, "COMPLETE", timeout=90_000)
        final = await watcher.wait_for(lambda state: state["phase"] == "COMPLETE")

    updates = await updates_for(page, job_id)
    assert_never_backwards(updates)
    assert updates[-1]["seq"] == final["seq"]
    await assert_finished_display(page, job_id)


async def test_blocked_websockets_fall_back_to_sse(page: Page, demo_server: DemoServer) -> None:
    refused = 0

    async def refuse(ws: WebSocketRoute) -> None:
        # What a proxy that kills upgrades looks like from the page.
        nonlocal refused
        refused += 1
        await ws.close()

    await page.route_web_socket(re.compile(r"/v1/ws"), refuse)
    await open_demo(page, demo_server)
    job_id = await start_generation(page, panels=4)
    await page.wait_for_function("() => window.__phasecast.transport === 'sse'")
    assert await page.get_by_test_id("transport").inner_text() == "sse"
    await wait_phase(page, job_id, "COMPLETE")

    updates = await updates_for(page, job_id)
    assert_never_backwards(updates)
    assert refused >= 3
    assert {u["transport"] for u in updates} == {"sse"}, {u["transport"] for u in updates}
    assert phases_in_order(updates)[-3:] == ["GENERATING", "POST_PROCESSING", "COMPLETE"]
    # The same states the server recorded, field for field.
    history = {event["seq"]: event for event in demo_server.history(job_id)}
    for update in updates:
        event = history.get(update["seq"])
        assert event is not None, f"seq {update['seq']} is not in the server's history"
        assert (update["phase"], update["progress"]) == (event["phase"], event["progress"])
    await assert_finished_display(page, job_id)


async def test_three_concurrent_generations_on_one_socket(page: Page, demo_server: DemoServer) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await open_demo(page, demo_server)
    panels = {await start_generation(page, panels=n): n for n in (3, 5, 8)}
    for job_id in panels:
        await wait_phase(page, job_id, "COMPLETE")

    for job_id, count in panels.items():
        updates = await updates_for(page, job_id)
        assert_never_backwards(updates)
        assert max(u["stepsTotal"] or 0 for u in updates) == count, job_id
        assert demo_server.job(job_id)["phase"] == "COMPLETE"
        assert updates[-1]["seq"] == demo_server.job(job_id)["seq"]
        await assert_finished_display(page, job_id)
    assert len(sockets) == 1, f"expected one shared WebSocket, the page opened {sockets}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def test_update_latency_and_screenshot(
    page: Page, demo_server: DemoServer, record_latency: Callable[[str, float], None]
) -> None:
    await open_demo(page, demo_server, query="")
    jobs = [await start_generation(page, panels=n) for n in (4, 6)]
    await wait_phase(page, jobs[-1], "GENERATING")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-running.png"), full_page=True)
    for job_id in jobs:
        await wait_phase(page, job_id, "COMPLETE")

    updates: list[Update] = await page.evaluate("window.__phasecast.updates")
    latencies = [u["latencyMs"] for u in updates]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    for value in latencies:
        record_latency("browser page (updated_at -> received, WebSocket)", value / 1000)
    await page.screenshot(path=str(ARTIFACTS / "demo-finished.png"), full_page=True)
    save_json(
        "latency.json",
        {
            "n": len(latencies),
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": max(latencies),
            "mean_ms": statistics.fmean(latencies),
        },
    )
    print(
        f"browser update latency: n={len(latencies)} p50={p50:.1f} ms p99={p99:.1f} ms max={max(latencies):.1f} ms"
    )

    assert len(latencies) >= 30
    # Sanity only: same machine, same clock. updated_at has millisecond precision, so a
    # value may round to slightly below zero.
    assert min(latencies) > -5, min(latencies)
    assert p50 < 500, f"median latency {p50:.0f} ms: the page is far behind the server"
