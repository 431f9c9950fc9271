"""Bad input gets the specified status or close code, a JSON body naming the problem, and
leaves every job exactly as it was."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from tests.support.clients import WSWatcher
from tests.support.process import TEST_SECRET, ServerProcess


def unsigned_token(sub: str = "alice") -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'sub': sub, 'scope': 'admin', 'exp': time.time() + 600})}."


def expired_token() -> str:
    return jwt.encode({"sub": "alice", "scope": "jobs:write", "exp": time.time() - 120}, TEST_SECRET)


def forged_token() -> str:
    return jwt.encode({"sub": "alice", "scope": "admin", "exp": time.time() + 600}, "not-the-secret" * 4)


BAD_TOKENS = {
    "expired": expired_token,
    "alg-none": unsigned_token,
    "wrong-signature": forged_token,
    "garbage": lambda: "not.a.jwt",
}


@pytest.fixture
def server(module_server: ServerProcess) -> ServerProcess:
    return module_server


@pytest.fixture
def job_id() -> str:
    return f"comic-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def api(server: ServerProcess, worker_token: str, job_id: str) -> AsyncIterator[httpx.AsyncClient]:
    """A worker's client, and a job of this test's own at GENERATING 40 %, seq 2."""
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        created = await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice", "metadata": {"t": 1}})
        assert created.status_code == 201
        reply = await client.post(f"/v1/jobs/{job_id}/progress", json={"phase": "GENERATING", "phase_progress": 40})
        assert reply.json()["state"]["seq"] == 2
        client.headers["X-Test-Job"] = job_id
        yield client


async def stored(api: httpx.AsyncClient) -> dict[str, Any]:
    reply = await api.get(f"/v1/jobs/{api.headers['X-Test-Job']}")
    assert reply.status_code == 200
    state: dict[str, Any] = reply.json()
    return state


def assert_error(reply: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    body = reply.json()["error"]
    assert body["code"] == code
    assert body["message"]
    if field is not None:
        assert body.get("field") == field, body


@pytest.mark.parametrize("token_kind", sorted(BAD_TOKENS))
async def test_bad_tokens_are_refused_everywhere(job_id: str,
    server: ServerProcess, api: httpx.AsyncClient, token_kind: str
) -> None:
    before = await stored(api)
    token = BAD_TOKENS[token_kind]()
    bearer = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        for reply in (
            await anonymous.get(f"/v1/jobs/{job_id}", headers=bearer),
            await anonymous.post(f"/v1/jobs/{job_id}/progress", headers=bearer,
                                 json={"phase": "POST_PROCESSING", "phase_progress": 90}),
            await anonymous.post(f"/v1/jobs/{job_id}/cancel", headers=bearer),
            await anonymous.get(f"/v1/jobs/{job_id}/events?access_token={token}"),
        ):
            assert_error(reply, 401, "unauthorized")
            assert reply.headers["www-authenticate"] == "Bearer"
    watcher = await WSWatcher(server.url, token).connect()
    assert await watcher.wait_closed() == 4401
    assert await stored(api) == before
    assert token not in server.log()  # tokens never reach the logs


async def test_missing_token_and_wrong_scheme(job_id: str, server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        assert_error(await anonymous.get(f"/v1/jobs/{job_id}"), 401, "unauthorized")
        assert_error(await anonymous.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    silent = await WSWatcher(server.url).connect()
    await silent.subscribe(job_id)  # not an auth message
    assert await silent.wait_closed() == 4401


async def test_another_users_job_is_forbidden_on_every_transport(job_id: str,
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    before = await stored(api)
    bob = make_token("bob")
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {bob}"}) as as_bob:
        assert_error(await as_bob.get(f"/v1/jobs/{job_id}"), 403, "forbidden")
        assert_error(await as_bob.post(f"/v1/jobs/{job_id}/cancel"), 403, "forbidden")
        assert_error(await as_bob.get(f"/v1/jobs/{job_id}/events"), 403, "forbidden")
        assert_error(await as_bob.post(f"/v1/jobs/{job_id}/progress", json={"phase": "GENERATING"}), 403, "forbidden")
        assert_error(await as_bob.get("/v1/jobs?owner=alice"), 403, "forbidden")
        assert (await as_bob.get("/v1/jobs")).json() == {"jobs": []}
    watcher = await WSWatcher(server.url, bob).connect()
    await watcher.subscribe(job_id)
    error = await watcher.wait_message("error", job_id=job_id)
    assert error["code"] == "forbidden"
    # The socket stays open for the user's other subscriptions.
    await watcher.send({"op": "ping"})
    await watcher.wait_message("pong")
    assert job_id not in watcher.states
    await watcher.close()
    assert await stored(api) == before


async def test_a_token_without_any_watch_scope_is_closed_with_4403(
    server: ServerProcess, make_token: Callable[..., str]
) -> None:
    watcher = await WSWatcher(server.url, make_token("alice", ())).connect()
    assert await watcher.wait_closed() == 4403


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"phase": "GENERATING", "phase_progress": 101}, 422, "invalid", "phase_progress"),
        ({"phase": "GENERATING", "phase_progress": -5}, 422, "invalid", "phase_progress"),
        ({"phase": "GENERATING", "step": "p1", "step_progress": 250}, 422, "invalid", "step_progress"),
        ({"phase": "SLEEPING", "phase_progress": 5}, 422, "invalid", "phase"),
        ({"phase": "COMPLETE"}, 422, "invalid", "phase"),
        ({"phase_progress": 5}, 422, "invalid", "phase"),
        ({"phase": "GENERATING", "surprise": 1}, 422, "invalid", "surprise"),
        ({"phase": "GENERATING", "step_status": "done"}, 422, "invalid", "step"),
        ({"phase": "GENERATING", "step": "p1", "phase_progress": 5}, 422, "invalid", "phase_progress"),
    ],
)
async def test_out_of_range_and_malformed_values_name_the_field(job_id: str,
    api: httpx.AsyncClient, body: dict[str, Any], status: int, code: str, field: str
) -> None:
    before = await stored(api)
    assert_error(await api.post(f"/v1/jobs/{job_id}/progress", json=body), status, code, field)
    assert await stored(api) == before


async def test_malformed_json_is_a_400(job_id: str, api: httpx.AsyncClient) -> None:
    before = await stored(api)
    reply = await api.post(
        f"/v1/jobs/{job_id}/progress", content=b'{"phase": "GENERATING", ', headers={"Content-Type": "application/json"}
    )
    assert_error(reply, 400, "invalid_json")
    assert await stored(api) == before


async def test_a_phase_regression_is_acknowledged_and_ignored(job_id: str, api: httpx.AsyncClient) -> None:
    before = await stored(api)
    reply = await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "ANALYZING", "phase_progress": 100})
    assert reply.status_code == 200
    assert reply.json() == {"applied": False, "state": before}
    lower = await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "GENERATING", "phase_progress": 10})
    assert lower.json()["applied"] is False
    assert await stored(api) == before


async def test_unknown_jobs_are_404(job_id: str, api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/v1/jobs/nope"), 404, "not_found")
    assert_error(await api.post("/v1/jobs/nope/progress", json={"phase": "GENERATING"}), 404, "not_found")
    assert_error(await api.get("/v1/jobs/nope/events"), 404, "not_found")
    assert_error(await api.get("/v1/jobs/bad%20id!"), 422, "invalid", "job_id")


async def test_oversized_metadata_and_duplicate_ids_are_refused(job_id: str, api: httpx.AsyncClient) -> None:
    assert_error(await api.post("/v1/jobs", json={"metadata": {"blob": "x" * 20_000}}), 422, "invalid", "metadata")
    assert_error(await api.post("/v1/jobs", json={"job_id": job_id}), 409, "conflict")
    assert (await stored(api))["metadata"] == {"t": 1}


async def test_a_finished_job_answers_409(job_id: str, api: httpx.AsyncClient) -> None:
    await api.post(f"/v1/jobs/{job_id}/fail", json={"error": {"code": "gpu", "message": "out of memory"}})
    before = await stored(api)
    assert before["phase"] == "FAILED" and before["error"] == {"code": "gpu", "message": "out of memory"}
    assert_error(await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "POST_PROCESSING"}), 409, "terminal")
    assert_error(await api.post(f"/v1/jobs/{job_id}/complete"), 409, "terminal")
    assert (await api.post(f"/v1/jobs/{job_id}/fail", json={"error": {"code": "gpu", "message": "again"}})).json()[
        "applied"
    ] is False
    assert await stored(api) == before


async def test_websocket_protocol_errors_keep_the_socket_open(job_id: str,
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    watcher = await WSWatcher(server.url, make_token("alice")).connect()
    assert watcher.connection is not None
    await watcher.connection.send("{not json")
    await watcher.wait_message("error", code="invalid_message")
    await watcher.send({"op": "dance"})
    await watcher.wait_for(lambda w: sum(m.get("code") == "invalid_message" for m in w.messages) == 2)
    await watcher.send({"op": "subscribe", "job_id": job_id, "since": "yesterday"})
    await watcher.wait_message("error", code="invalid", job_id=job_id)
    await watcher.subscribe("missing-job")
    await watcher.wait_message("error", code="not_found", job_id="missing-job")
    # A key named twice: which value wins depends on the reader, so the message is refused
    # like one that is not JSON, and nothing is subscribed.
    await watcher.connection.send(
        json.dumps({"op": "subscribe", "job_id": job_id})[:-1] + ', "job_id": "missing-job"}'
    )
    await watcher.wait_for(lambda w: sum(m.get("code") == "invalid_message" for m in w.messages) == 3)
    # Messages are answered in order: once this one's answer is in, the refused message's
    # would be too. Neither of its job ids was subscribed (no state, no second not_found
    # before this one's).
    await watcher.subscribe("missing-job")
    await watcher.wait_for(lambda w: sum(m.get("code") == "not_found" for m in w.messages) == 2)
    assert job_id not in watcher.states
    assert [m.get("code") for m in watcher.messages][-2:] == ["invalid_message", "not_found"]
    await watcher.subscribe(job_id)
    await watcher.wait_seq(job_id, 2)
    await watcher.close()
