"""Details of the wire protocol (docs/protocol.md) against a real server on each engine."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import httpx
import pytest
import websockets
from tests.support.clients import SSEEvent, WSWatcher, sse_events
from tests.support.process import ServerProcess


@pytest.fixture
def server(ws_module_server: ServerProcess) -> ServerProcess:
    return ws_module_server


@pytest.fixture
async def api(server: ServerProcess, worker_token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {worker_token}"}) as client:
        yield client


async def new_job(api: httpx.AsyncClient, owner: str = "alice") -> str:
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    reply = await api.post("/v1/jobs", json={"job_id": job_id, "owner": owner})
    assert reply.status_code == 201, reply.text
    assert reply.headers["location"] == f"/v1/jobs/{job_id}"
    return job_id


async def report(api: httpx.AsyncClient, job_id: str, progress: float) -> int:
    reply = await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "ANALYZING", "phase_progress": progress})
    assert reply.status_code == 200
    seq: int = reply.json()["state"]["seq"]
    return seq


async def test_auth_by_first_message_and_pings(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    watcher = await WSWatcher(server.url, make_token("alice")).connect(token_in_url=False)
    await watcher.send({"op": "auth", "token": make_token("alice")})
    await watcher.subscribe(job_id)
    await watcher.wait_message("subscribed", job_id=job_id)
    await watcher.wait_seq(job_id, 1)
    await watcher.wait_message("ping", timeout=5)  # the test server pings every second
    await watcher.send({"op": "ping"})
    await watcher.wait_message("pong")
    await watcher.close()


async def test_since_skips_what_the_client_has_and_resubscribe_fills_the_gap(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    await report(api, job_id, 10)
    await report(api, job_id, 20)
    watcher = await WSWatcher(server.url, make_token("alice")).connect()
    await watcher.subscribe(job_id, since=3)
    await watcher.wait_message("subscribed", job_id=job_id)
    seq = await report(api, job_id, 30)
    await watcher.wait_seq(job_id, seq)
    assert watcher.seqs(job_id) == [4]

    await watcher.send({"op": "unsubscribe", "job_id": job_id})
    await watcher.wait_message("unsubscribed", job_id=job_id)
    await report(api, job_id, 40)
    await watcher.subscribe(job_id, since=4)
    await watcher.wait_seq(job_id, 5)
    assert watcher.seqs(job_id) == [4, 5]  # the change made while away arrives once, as the current state
    await watcher.close()


async def test_one_connection_watches_many_jobs_and_the_cap_is_enforced(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    jobs = [await new_job(api) for _ in range(3)]
    watcher = await WSWatcher(server.url, make_token("alice")).connect()
    for job_id in jobs:
        await watcher.subscribe(job_id)
        await watcher.wait_seq(job_id, 1)
    for job_id in jobs:
        await report(api, job_id, 50)
    for job_id in jobs:
        await watcher.wait_seq(job_id, 2)
        assert watcher.seqs(job_id) == [1, 2]
    more = [await new_job(api) for _ in range(98)]  # 101 in all; the default cap is 100
    for job_id in more:
        await watcher.subscribe(job_id)
    refused = await watcher.wait_message("error", code="too_many_subscriptions")
    assert refused["job_id"] == more[-1]
    await watcher.wait_for(lambda w: len(w.states) == 100)
    assert more[-1] not in watcher.states
    await watcher.close()


async def test_sse_resumes_from_last_event_id_sends_retry_and_heartbeats_and_ends(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    await report(api, job_id, 10)
    await report(api, job_id, 20)
    token = make_token("alice")
    seen: list[SSEEvent | str] = []
    got_heartbeat = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:

        async def read() -> None:
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": "2"}
            async for item in sse_events(client, f"/v1/jobs/{job_id}/events", headers=headers):
                seen.append(item)
                if item == ": ping":
                    got_heartbeat.set()

        reader = asyncio.create_task(read())
        await asyncio.wait_for(got_heartbeat.wait(), 5)  # pings every second in tests
        await api.post(f"/v1/jobs/{job_id}/complete", json={})
        await asyncio.wait_for(reader, 10)  # ends by itself after the terminal state
    events = [e for e in seen if isinstance(e, SSEEvent)]
    assert [e.id for e in events] == [f"{e.json()['seq']}.{e.json()['epoch']}" for e in events]
    assert [e.json()["seq"] for e in events] == [3, 4]  # a bare seq resumes too (older ids)
    assert events[-1].json()["phase"] == "COMPLETE"


async def test_sse_raw_format_has_retry_first(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    await api.post(f"/v1/jobs/{job_id}/complete", json={})
    async with httpx.AsyncClient(base_url=server.url) as client:
        reply = await client.get(f"/v1/jobs/{job_id}/events", params={"access_token": make_token("alice")})
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["cache-control"] == "no-cache"
    assert re.fullmatch(r"retry: \d+\n\nid: 2\.[0-9a-f]{12}\nevent: state\ndata: \{.*\}\n\n", reply.text, re.S)


async def test_listing_and_history(server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]) -> None:
    owner = f"user-{uuid.uuid4().hex[:6]}"
    first = await new_job(api, owner)
    second = await new_job(api, owner)
    await api.post(f"/v1/jobs/{first}/cancel", json={"reason": "changed my mind"})
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {make_token(owner)}"}) as me:
        every = (await me.get("/v1/jobs")).json()["jobs"]
        assert [j["job_id"] for j in every] == [second, first]
        active = (await me.get("/v1/jobs", params={"status": "active"})).json()["jobs"]
        assert [j["job_id"] for j in active] == [second]
        history = (await me.get(f"/v1/jobs/{first}/history")).json()
        assert [(e["seq"], e["phase"]) for e in history["events"]] == [(1, "QUEUED"), (2, "CANCELLED")]
        assert history["events"][-1]["message"] == "changed my mind"


async def test_service_endpoints(server: ServerProcess, api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json()["status"] == "ok"
    assert (await api.get("/readyz")).json() == {"status": "ready"}
    metrics = (await api.get("/metrics")).text
    for name in ("phasecast_connections", "phasecast_watchers", "phasecast_updates_total",
                 "phasecast_messages_sent_total", "phasecast_delivery_latency_seconds_bucket"):
        assert name in metrics
    spec = (await api.get("/openapi.json")).json()
    assert "/v1/jobs/{job_id}/progress" in spec["paths"]
    reply = await api.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert reply.headers["x-request-id"] == "trace-123"


async def test_a_batch_applies_reports_in_order_and_reports_each_result(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    first, second = await new_job(api), await new_job(api)
    watcher = await WSWatcher(server.url, make_token("alice")).connect()
    await watcher.subscribe(first)
    await watcher.wait_seq(first, 1)
    updates = [
        {"job_id": first, "phase": "ANALYZING", "phase_progress": 10},
        {"job_id": second, "phase": "GENERATING", "step": "p1", "step_progress": 50, "steps_total": 2},
        {"job_id": first, "phase": "ANALYZING", "phase_progress": 60},
        {"job_id": first, "phase": "ANALYZING", "phase_progress": 30},  # late: ignored
        {"job_id": "missing-job", "phase": "ANALYZING"},
    ]
    reply = await api.post("/v1/progress", json={"updates": updates})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["job_id"] for r in results] == [u["job_id"] for u in updates]
    assert [(r.get("applied"), r.get("seq")) for r in results[:4]] == [(True, 2), (True, 2), (True, 3), (False, 3)]
    assert results[4]["error"]["code"] == "not_found"
    await watcher.wait_seq(first, 3)
    assert (await api.get(f"/v1/jobs/{first}")).json()["phase_progress"] == 60.0
    assert (await api.get(f"/v1/jobs/{second}")).json()["phase_progress"] == 25.0
    # A report that breaks a rule of its own (out of range, or a step with phase_progress)
    # rejects the whole batch, before anything applies.
    for bad, field in (({"job_id": first, "phase": "ANALYZING", "phase_progress": 150}, "updates.1.phase_progress"),
                       ({"job_id": second, "phase": "GENERATING", "step": "p1", "phase_progress": 5}, "updates.1.phase_progress"),
                       ({"job_id": second, "phase": "GENERATING", "step_status": "done"}, "updates.1.step")):
        refused = await api.post("/v1/progress", json={"updates": [{"job_id": first, "phase": "POST_PROCESSING"}, bad]})
        assert refused.status_code == 422
        assert refused.json()["error"]["field"] == field
    assert (await api.get(f"/v1/jobs/{first}")).json()["seq"] == 3
    too_many = await api.post("/v1/progress", json={"updates": [updates[0]] * 501})
    assert too_many.status_code == 422
    assert too_many.json()["error"]["field"] == "updates"
    await watcher.close()


# --- credentials on a long-lived connection (docs/protocol.md, WebSocket) -------------------


async def test_every_accepted_auth_is_acknowledged_with_its_expiry(
    server: ServerProcess, make_token: Callable[..., str]
) -> None:
    before = time.time()
    by_url = await WSWatcher(server.url, make_token("alice", ttl=600)).connect()
    first = await by_url.wait_message("authenticated")
    assert first["job_id"] is None
    assert before + 590 <= first["expires_at"] <= time.time() + 610
    await by_url.send({"op": "auth", "token": make_token("alice", ttl=1200)})
    await by_url.wait_for(lambda w: len([m for m in w.messages if m["type"] == "authenticated"]) == 2)
    renewed = [m for m in by_url.messages if m["type"] == "authenticated"][-1]
    assert renewed["expires_at"] >= first["expires_at"] + 590
    await by_url.close()

    by_message = await WSWatcher(server.url).connect(token_in_url=False)
    await by_message.send({"op": "auth", "token": make_token("alice", ttl=300)})
    assert (await by_message.wait_message("authenticated"))["expires_at"] <= time.time() + 310
    await by_message.close()


async def test_the_connection_closes_4401_when_its_token_expires(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    # 3 s: tokens are minted with whole-second times, so this one lives 2 to 3 s, long
    # enough to be accepted on a loaded machine (2 left as little as 1 s).
    watcher = await WSWatcher(server.url, make_token("alice", ttl=3)).connect()
    expires_at = (await watcher.wait_message("authenticated"))["expires_at"]
    await watcher.subscribe(job_id)
    await watcher.wait_seq(job_id, 1)
    assert await watcher.wait_closed(timeout=15) == 4401
    assert time.time() >= expires_at
    assert watcher.connection is not None
    assert watcher.connection.close_reason == "token expired"


async def test_a_token_refreshed_before_expiry_keeps_the_connection_open(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    watcher = await WSWatcher(server.url, make_token("alice", ttl=3)).connect()
    old_expiry = (await watcher.wait_message("authenticated"))["expires_at"]
    await watcher.subscribe(job_id)
    await watcher.wait_seq(job_id, 1)
    await watcher.send({"op": "auth", "token": make_token("alice", ttl=600)})
    await watcher.wait_for(lambda w: len([m for m in w.messages if m["type"] == "authenticated"]) == 2)
    # Wait for server pings (every second) until the old token is well past its expiry.
    await watcher.wait_for(
        lambda w: any(m["type"] == "ping" for m in w.messages) and time.time() > old_expiry + 1.5,
        timeout=15,
    )
    seq = await report(api, job_id, 50)
    await watcher.wait_seq(job_id, seq)
    assert watcher.close_code is None
    await watcher.close()


async def test_a_narrower_token_drops_the_subscriptions_it_cannot_read(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    mine, theirs = await new_job(api, "alice"), await new_job(api, "bob")
    watcher = await WSWatcher(server.url, make_token("alice", ("jobs:read", "jobs:write"))).connect()
    for job_id in (mine, theirs):
        await watcher.subscribe(job_id)
        await watcher.wait_seq(job_id, 1)
    await watcher.send({"op": "auth", "token": make_token("alice", ("jobs:read",))})
    dropped = await watcher.wait_message("error", job_id=theirs)
    assert dropped["code"] == "forbidden"
    assert theirs in dropped["message"]
    await report(api, theirs, 50)
    seq = await report(api, mine, 50)  # reported after theirs: if theirs came, it came first
    await watcher.wait_seq(mine, seq)
    assert watcher.seqs(theirs) == [1]
    assert not [m for m in watcher.messages if m["type"] == "error" and m["job_id"] == mine]
    # Re-subscribing with the narrower token is refused like any other user's job.
    await watcher.subscribe(theirs)
    await watcher.wait_for(lambda w: len([m for m in w.messages if m.get("job_id") == theirs and m["type"] == "error"]) == 2)
    await watcher.close()


async def test_another_users_token_or_a_bad_one_closes_the_connection(
    server: ServerProcess, make_token: Callable[..., str]
) -> None:
    switch = await WSWatcher(server.url, make_token("alice")).connect()
    await switch.send({"op": "auth", "token": make_token("mallory")})
    assert await switch.wait_closed() == 4403
    bad = await WSWatcher(server.url, make_token("alice")).connect()
    await bad.send({"op": "auth", "token": "not-a-jwt"})
    assert await bad.wait_closed() == 4401


# --- acknowledgements under backpressure, resume points ---------------------------------------


async def test_acknowledgements_are_never_dropped_while_the_socket_is_backed_up(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    big = f"big-{uuid.uuid4().hex[:8]}"
    reply = await api.post("/v1/jobs", json={"job_id": big, "owner": "alice", "metadata": {"notes": "x" * 15_000}})
    assert reply.status_code == 201, reply.text
    others = [await new_job(api) for _ in range(40)]
    url = f"{server.ws_url}/v1/ws?access_token={quote(make_token('alice'))}"
    async with websockets.connect(url, max_queue=1, max_size=2**20, compression=None, ping_interval=None) as stalled:
        assert json.loads(await stalled.recv())["type"] == "authenticated"
        await stalled.send(json.dumps({"op": "subscribe", "job_id": big}))
        # The client reads nothing more now: fill every buffer on the way with big states.
        for n in range(150):
            await api.post(f"/v1/jobs/{big}/progress", json={"phase": "ANALYZING", "phase_progress": n / 2, "message": str(n)})
        for job_id in others:
            await stalled.send(json.dumps({"op": "subscribe", "job_id": job_id}))
            await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "ANALYZING", "phase_progress": 5})
        seen: dict[str, list[str]] = {}
        async with asyncio.timeout(30):
            while any(len(seen.get(j, [])) < 2 or seen[j][-1] != "state:2" for j in others):
                message = json.loads(await stalled.recv())
                if message["type"] == "state":
                    seen.setdefault(message["job"]["job_id"], []).append(f"state:{message['job']['seq']}")
                elif message["type"] in ("subscribed", "error"):
                    seen.setdefault(message["job_id"], []).append(message["type"])
    for job_id in others:
        # The acknowledgement first, then states in seq order (the newest may skip the first).
        assert seen[job_id][0] == "subscribed", seen[job_id]
        assert seen[job_id][-1] == "state:2"
        assert seen[job_id].count("subscribed") == 1


async def test_a_resume_point_the_server_cannot_honour_gets_the_full_state(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    await report(api, job_id, 10)
    state = (await api.get(f"/v1/jobs/{job_id}")).json()
    watcher = await WSWatcher(server.url, make_token("alice")).connect()
    await watcher.send({"op": "subscribe", "job_id": job_id, "since": 50})  # beyond seq 2
    await watcher.wait_seq(job_id, 2)
    await watcher.send({"op": "unsubscribe", "job_id": job_id})
    await watcher.wait_message("unsubscribed", job_id=job_id)
    await watcher.send({"op": "subscribe", "job_id": job_id, "since": 2, "epoch": "not-" + state["epoch"]})
    await watcher.wait_for(lambda w: len(w.seqs(job_id)) == 2)
    assert watcher.seqs(job_id) == [2, 2]
    await watcher.send({"op": "unsubscribe", "job_id": job_id})
    await watcher.wait_message("unsubscribed", job_id=job_id)
    # Its own epoch and seq: honoured, nothing is re-sent; the next change arrives.
    await watcher.send({"op": "subscribe", "job_id": job_id, "since": 2, "epoch": state["epoch"]})
    await watcher.wait_for(lambda w: len([m for m in w.messages if m["type"] == "subscribed"]) == 3)
    seq = await report(api, job_id, 20)
    await watcher.wait_seq(job_id, seq)
    assert watcher.seqs(job_id) == [2, 2, 3]
    await watcher.close()
