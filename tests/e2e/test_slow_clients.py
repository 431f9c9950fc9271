"""Slow and stalled clients, over raw sockets, against real server processes with
``PHASECAST_REQUEST_TIMEOUT=1``: a request whose headers or body stop coming is answered 408
``request_timeout`` with ``Connection: close`` and the connection closed (a connection that
never sent a byte is just closed), on every path a body can take: the thin report path in
the HTTP protocol (``raw``) and in the ASGI layer (``asgi``), the full routes behind the
request guard (announced length, over-cap length, chunked), the RunPod webhook; the
WebSocket upgrade request too. Nothing is stored for such a request. A client that is slow
but sends its request within the limit is answered as usual."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from tests.support.process import ServerProcess

from phasecast.integrations.runpod import WEBHOOK_PATH, webhook_token

TIMEOUT = 1.0
# Generous: the answer is due after TIMEOUT plus the sweep's interval; this only bounds a
# test that would otherwise hang on a server that never answers.
ANSWER_WITHIN = 15.0
WEBHOOK_SECRET = "slow-clients-webhook-secret-0123456789abcdef"


@pytest.fixture(scope="module", params=["raw", "asgi"])
def slow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("server")
    env = {
        "PHASECAST_INGEST_TRANSPORT": request.param,
        "PHASECAST_REQUEST_TIMEOUT": str(TIMEOUT),
        # The RunPod integration, for its webhook route (no call reaches RunPod here).
        "PHASECAST_RUNPOD_ENDPOINT": "slow-clients-endpoint",
        "PHASECAST_RUNPOD_API_KEY": "slow-clients-key",
        "PHASECAST_RUNPOD_BASE_URL": "http://127.0.0.1:9/v2",
        "PHASECAST_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    with ServerProcess(f"sqlite:///{folder / 'phasecast.db'}", env=env,
                       log_path=folder / "server.log") as process:
        yield process


@pytest.fixture
async def api(slow_server: ServerProcess, worker_token: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=slow_server.url, headers=headers) as client:
        yield client


async def new_job(api: httpx.AsyncClient) -> tuple[str, bytes]:
    job_id = f"slow-{uuid.uuid4().hex[:10]}"
    created = await api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})
    assert created.status_code == 201
    reported = await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "GENERATING", "phase_progress": 5})
    assert reported.status_code == 200
    stored = await api.get(f"/v1/jobs/{job_id}")
    return job_id, stored.content


def request_head(server: ServerProcess, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_then_stall(server: ServerProcess, data: bytes) -> bytes:
    """Send ``data`` and nothing more; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), ANSWER_WITHIN)  # to the server's close
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def assert_timed_out(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout", answer
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert len(body) == int(headers["content-length"])
    assert json.loads(body)["error"]["code"] == "request_timeout"


def report_headers(token: str, length: int, *, json_type: bool = True) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", "Content-Length": str(length)}
    if json_type:
        headers["Content-Type"] = "application/json"
    return headers


async def test_a_report_whose_body_stalls_is_answered_408_and_changes_nothing(
    slow_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    # Taken by the thin path (a JSON body of a small announced length, a worker token).
    job_id, before = await new_job(api)
    body = b'{"phase": "GENERATING", "phase_progress": 50}'
    head = request_head(slow_server, "POST", f"/v1/jobs/{job_id}/progress",
                        report_headers(worker_token, len(body) + 40))
    assert_timed_out(await send_then_stall(slow_server, head + body))
    assert (await api.get(f"/v1/jobs/{job_id}")).content == before


async def test_a_batch_whose_body_stalls_is_answered_408_and_changes_nothing(
    slow_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id, before = await new_job(api)
    body = json.dumps({"updates": [{"job_id": job_id, "phase": "GENERATING", "phase_progress": 50}]}).encode()
    head = request_head(slow_server, "POST", "/v1/progress", report_headers(worker_token, len(body) + 1))
    assert_timed_out(await send_then_stall(slow_server, head + body))
    assert (await api.get(f"/v1/jobs/{job_id}")).content == before


async def test_a_full_route_body_that_stalls_is_answered_408_and_changes_nothing(
    slow_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id, before = await new_job(api)
    # No Content-Type: the full route (which reads no Content-Type as JSON), not the thin path.
    body = b'{"phase": "GENERATING", "phase_progress": 50}'
    head = request_head(slow_server, "POST", f"/v1/jobs/{job_id}/progress",
                        report_headers(worker_token, len(body) + 40, json_type=False))
    assert_timed_out(await send_then_stall(slow_server, head + body))
    # complete, behind the request guard and the route's own cap
    body = b'{"message": "done"}'
    head = request_head(slow_server, "POST", f"/v1/jobs/{job_id}/complete",
                        report_headers(worker_token, len(body) + 40))
    assert_timed_out(await send_then_stall(slow_server, head + body))
    assert (await api.get(f"/v1/jobs/{job_id}")).content == before


async def test_a_create_whose_body_stalls_is_answered_408_and_creates_nothing(
    slow_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id = f"slow-{uuid.uuid4().hex[:10]}"
    body = json.dumps({"job_id": job_id, "owner": "alice"}).encode()
    head = request_head(slow_server, "POST", "/v1/jobs", report_headers(worker_token, len(body) + 1))
    assert_timed_out(await send_then_stall(slow_server, head + body))
    assert (await api.get(f"/v1/jobs/{job_id}")).status_code == 404


async def test_a_body_announced_over_the_cap_that_stalls_is_answered_408(
    slow_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    # A little over the route's 32 KiB cap: the guard reads it to its end before answering
    # 413, and must not wait for the rest forever.
    job_id, before = await new_job(api)
    for json_type in (True, False):
        head = request_head(slow_server, "POST", f"/v1/jobs/{job_id}/progress",
                            report_headers(worker_token, 32 * 1024 + 100, json_type=json_type))
        assert_timed_out(await send_then_stall(slow_server, head + b'{"phase": "GENERATING"'))
    assert (await api.get(f"/v1/jobs/{job_id}")).content == before


async def test_a_chunked_body_that_stalls_is_answered_408_and_changes_nothing(
    slow_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id, before = await new_job(api)
    headers = {"Authorization": f"Bearer {worker_token}", "Content-Type": "application/json",
               "Transfer-Encoding": "chunked"}
    head = request_head(slow_server, "POST", f"/v1/jobs/{job_id}/progress", headers)
    assert_timed_out(await send_then_stall(slow_server, head + b"10\r\n" + b'{"phase": "GENER' + b"\r\n"))
    # stopped in the middle of a chunk
    assert_timed_out(await send_then_stall(slow_server, head + b"40\r\n" + b'{"phase": "GENER'))
    assert (await api.get(f"/v1/jobs/{job_id}")).content == before


async def test_a_webhook_body_that_stalls_is_answered_408(slow_server: ServerProcess) -> None:
    job, step = f"slow-{uuid.uuid4().hex[:10]}", "render"
    token = webhook_token(WEBHOOK_SECRET, job, step)
    head = request_head(slow_server, "POST", f"{WEBHOOK_PATH}?job={job}&step={step}&token={token}",
                        {"Content-Type": "application/json", "Content-Length": "200"})
    assert_timed_out(await send_then_stall(slow_server, head + b'{"id": "x", "status": "COMPL'))


async def test_headers_that_stall_are_answered_408(slow_server: ServerProcess, worker_token: str) -> None:
    partial = (f"POST /v1/jobs/x/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {worker_token}\r\nContent-Le").encode()
    assert_timed_out(await send_then_stall(slow_server, partial))
    assert_timed_out(await send_then_stall(slow_server, b"GET /healthz HT"))
    # After a first request on the connection, the second one's headers stall.
    first = request_head(slow_server, "GET", "/healthz", {})
    answer = await send_then_stall(slow_server, first + b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert_timed_out(answer[answer.index(b"HTTP/1.1 408"):])


async def test_a_connection_that_sends_nothing_is_closed(slow_server: ServerProcess) -> None:
    assert await send_then_stall(slow_server, b"") == b""


async def test_a_websocket_upgrade_that_stalls_is_answered_408(slow_server: ServerProcess) -> None:
    partial = (b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n")
    assert_timed_out(await send_then_stall(slow_server, partial))


async def test_a_slow_client_within_the_limit_is_answered(
    slow_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id, _ = await new_job(api)
    for json_type in (True, False):  # thin path, full route
        body = b'{"phase": "GENERATING", "phase_progress": %d}' % (60 if json_type else 70)
        head = request_head(slow_server, "POST", f"/v1/jobs/{job_id}/progress",
                            report_headers(worker_token, len(body), json_type=json_type))
        data = head + body
        reader, writer = await asyncio.open_connection("127.0.0.1", slow_server.port)
        try:
            # In four pieces over about 0.45 s, well within the 1 s limit: the client is slow,
            # that is the behaviour under test.
            for start in range(0, len(data), len(data) // 4 + 1):
                writer.write(data[start:start + len(data) // 4 + 1])
                await writer.drain()
                await asyncio.sleep(0.15)
            status = await asyncio.wait_for(reader.readline(), ANSWER_WITHIN)
            assert status == b"HTTP/1.1 200 OK\r\n"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    stored = (await api.get(f"/v1/jobs/{job_id}")).json()
    assert stored["phase_progress"] == 70
