"""WebSockets blocked: the page watches many jobs over ONE multiplexed EventSource
(`GET /v1/events?job=…&job=…`), in real Chromium against a real ``phasecast demo``.

A browser allows about six HTTP/1.1 connections per origin, so one EventSource per job
would stall beyond five jobs; this watches ten at once. The count of streams is checked
three ways: EventSource objects the page created, requests Chromium sent to /v1/events,
and the server's own ``phasecast_connections{transport="sse"}`` gauge while jobs run.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from browser_support import FAST_RECOVERY, DemoServer
from playwright.async_api import Page, Request, WebSocketRoute
from test_demo_page import assert_never_backwards, updates_for, wait_phase

pytestmark = pytest.mark.browser

TERMINAL = {"COMPLETE", "FAILED", "CANCELLED"}

# Counts the EventSource objects the page creates, keeps their URLs, and records every raw
# `state` event as it came off the wire (before the client's seq check), so a test can see
# whether the server ever repeated a state.
COUNT_EVENT_SOURCES = """
(() => {
  const Native = window.EventSource;
  window.__eventSources = [];
  window.__rawStates = [];
  window.EventSource = class extends Native {
    constructor(url, init) {
      super(url, init);
      const stream = window.__eventSources.push(String(url)) - 1;
      this.addEventListener('state', (event) => {
        const job = JSON.parse(event.data);
        window.__rawStates.push({ stream, job_id: job.job_id, seq: job.seq, cursor: event.lastEventId });
      });
    }
  };
})();
"""


async def sse_connections(server: DemoServer) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{server.url}/metrics")).text
    match = re.search(r'^phasecast_connections\{transport="sse"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_ten_jobs_on_one_event_source_with_websockets_blocked(
    page: Page, slow_demo_server: DemoServer
) -> None:
    server = slow_demo_server

    async def refuse(ws: WebSocketRoute) -> None:
        await ws.close()  # what a proxy that kills upgrades looks like from the page

    stream_requests: list[str] = []
    per_job_streams: list[str] = []

    def on_request(request: Request) -> None:
        if "/v1/events" in request.url:
            stream_requests.append(request.url)
        if re.search(r"/v1/jobs/[^/]+/events", request.url):
            per_job_streams.append(request.url)

    page.on("request", on_request)
    await page.add_init_script(COUNT_EVENT_SOURCES)
    await page.route_web_socket(re.compile(r"/v1/ws"), refuse)

    # Ten generations running before the page opens: it finds them all in its first listing,
    # so all ten trackers mount at once.
    token = server.token()
    jobs: list[str] = []
    async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {token}"}) as client:
        for _ in range(10):
            response = await client.post(f"{server.url}/v1/demo/generations", json={"panels": 6})
            assert response.status_code == 201, response.text
            jobs.append(response.json()["job_id"])

    await page.goto(f"{server.url}/{FAST_RECOVERY}")
    await page.wait_for_function("() => window.__phasecast?.transport === 'sse'")
    await page.wait_for_function(
        "(ids) => ids.every((id) => window.__phasecast.updates.some((u) => u.job_id === id))", arg=jobs
    )
    # The server sees one SSE stream carrying every job: sampled while the page still watches
    # running jobs (checked before and after the sample, from the page, which is quick).
    still_running = """(ids) => ids.filter((id) => {
        const mine = window.__phasecast.updates.filter((u) => u.job_id === id);
        return !['COMPLETE', 'FAILED', 'CANCELLED'].includes(mine[mine.length - 1].phase);
    }).length"""
    assert await page.evaluate(still_running, jobs) > 0, "every job ended before the sample"
    gauge = await sse_connections(server)
    assert await page.evaluate(still_running, jobs) > 0, "every job ended during the sample"
    assert gauge == 1.0, gauge

    for job_id in jobs:
        tracker = page.locator(f'[data-job-id="{job_id}"]')
        await tracker.wait_for()
        await page.wait_for_function(
            "(id) => ['COMPLETE', 'FAILED', 'CANCELLED'].includes(document.querySelector(`[data-job-id=\"${id}\"]`)?.dataset.phase)",
            arg=job_id,
            timeout=90_000,
        )

    for job_id in jobs:
        final = server.job(job_id)
        await wait_phase(page, job_id, final["phase"])
        updates = await updates_for(page, job_id)
        assert_never_backwards(updates)
        assert updates[-1]["seq"] == final["seq"], (job_id, updates[-1], final["seq"])
        assert {u["transport"] for u in updates} == {"sse"}, job_id

    sources: list[str] = await page.evaluate("window.__eventSources")
    assert len(sources) == 1, f"expected one EventSource for all jobs, the page made {sources}"
    params: dict[str, Any] = httpx.URL(sources[0]).params
    assert sorted(params.get_list("job")) == sorted(jobs)
    assert len(stream_requests) == 1, stream_requests
    assert not per_job_streams, per_job_streams
    statuses: list[str] = await page.evaluate("window.__phasecast.connections.map((c) => c.status)")
    assert "fallback" in statuses, statuses


async def test_sse_fallback_resumes_every_job_from_the_cursor_after_a_server_restart(
    page: Page, slow_demo_server: DemoServer
) -> None:
    server = slow_demo_server

    async def refuse(ws: WebSocketRoute) -> None:
        await ws.close()

    await page.add_init_script(COUNT_EVENT_SOURCES)
    await page.route_web_socket(re.compile(r"/v1/ws"), refuse)
    token = server.token()
    jobs: list[str] = []
    async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {token}"}) as client:
        for _ in range(3):
            response = await client.post(f"{server.url}/v1/demo/generations", json={"panels": 6})
            assert response.status_code == 201, response.text
            jobs.append(response.json()["job_id"])

    # No polling: while the server is down the stream is retried (with backoff) rather than
    # given up for polling, so the test sees the stream itself resume.
    await page.goto(f"{server.url}/{FAST_RECOVERY}&transports=websocket,sse")
    await page.wait_for_function("() => window.__phasecast?.transport === 'sse'")
    await page.wait_for_function(
        "(ids) => ids.every((id) => window.__phasecast.updates.filter((u) => u.job_id === id).length >= 2)",
        arg=jobs,
        timeout=60_000,
    )
    streams_before = len(await page.evaluate("window.__eventSources"))

    # The stream drops mid-way (SIGKILL); the server comes back on the same port and store.
    server.kill()
    server.start()

    for job_id in jobs:
        await wait_phase(page, job_id, "COMPLETE", timeout=90_000)

    sources: list[str] = await page.evaluate("window.__eventSources")
    assert len(sources) > streams_before, "the page never reopened the stream"
    resumed = [httpx.URL(url).params.get("last_event_id") for url in sources[streams_before:]]
    assert all(resumed), f"a reopened stream did not pass the cursor: {sources[streams_before:]}"
    # Off the wire: across every stream, no job's seq arrived twice and none went back.
    raw: list[dict[str, Any]] = await page.evaluate("window.__rawStates")
    for job_id in jobs:
        seqs = [event["seq"] for event in raw if event["job_id"] == job_id]
        assert seqs == sorted(set(seqs)), f"{job_id}: the server repeated or reordered states: {seqs}"
        assert seqs[-1] == server.job(job_id)["seq"]
        updates = await updates_for(page, job_id)
        assert_never_backwards(updates)
