"""Hostile input, from outside, against real server processes on both engines.

Classes covered: bodies bounded before any work (token first, caps while streaming, both
framings, every route including the RunPod webhook); what is stored can always be read back
by every path; one id pattern everywhere; malformed requests get their documented 4xx; scope
on every read path.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.process import ServerProcess, free_port

from phasecast.integrations.runpod import WEBHOOK_PATH, webhook_token

MB = 1024 * 1024
WEBHOOK_SECRET = "hostile-input-webhook-secret-0123456789abcdef"


@pytest.fixture
def server(module_server: ServerProcess) -> ServerProcess:
    return module_server


def new_id(prefix: str = "hostile") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class BigBodyResult:
    status: int
    headers: dict[str, str]
    body: bytes
    answered_after_s: float  # from the first byte sent to the first byte of the answer
    sent_when_answered: int  # body bytes sent by then


def send_big_body(
    port: int, path: str, total: int, headers: dict[str, str], *, chunked: bool
) -> BigBodyResult:
    """Send ``total`` bytes of JSON-ish body (``[[1],[1],…``) over a raw socket, reading
    between writes, and stop as soon as the server answers. Returns the answer and how much
    of the body had been sent by then."""
    piece = b"[1]," * (16 * 1024)  # 64 KiB
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    received = b""
    sent = 0
    answered_at: float | None = None
    sent_when_answered = total
    started = time.perf_counter()
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        first = True
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            data = b"[" + piece[1:] if first else piece
            first = False
            data = data[: total - sent]
            frame = f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(data)
        if chunked and sent >= total:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"0\r\n\r\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if answered_at is None and data:
                answered_at = time.perf_counter()
                sent_when_answered = sent
            if not data:
                break
            received += data
            head, sep, rest = received.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(rest) >= length:
                    break
    finally:
        sock.close()
    assert answered_at is not None, f"no answer at all after sending {sent} bytes"
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found_headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return BigBodyResult(int(status_line.split()[1]), found_headers, body,
                         answered_at - started, sent_when_answered)


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["message"]
    return error


# --- 1. Bodies are bounded before any work ----------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("authenticated", [False, True], ids=["no-token", "worker-token"])
def test_a_50_mb_body_is_refused_before_it_is_read(
    server: ServerProcess, worker_token: str, chunked: bool, authenticated: bool
) -> None:
    headers = {"Authorization": f"Bearer {worker_token}"} if authenticated else {}
    before = rss_bytes(server.pid)
    result = send_big_body(server.port, "/v1/jobs", 50 * MB, headers, chunked=chunked)
    growth = rss_bytes(server.pid) - before
    print(f"\n50 MB {'chunked' if chunked else 'Content-Length'} body, "
          f"{'authenticated' if authenticated else 'no token'} ({server.engine.split(':')[0]}): "
          f"answered {result.status} after {result.answered_after_s * 1000:.1f} ms with "
          f"{result.sent_when_answered / MB:.2f} MB sent; server RSS grew {growth / MB:.2f} MB")
    if authenticated:
        assert result.status == 413
        assert error_of(result.body)["code"] == "too_large"
    else:
        assert result.status == 401
        assert error_of(result.body)["code"] == "unauthorized"
    assert result.headers.get("connection") == "close"
    assert result.sent_when_answered < 50 * MB  # answered before the body was all sent
    assert result.answered_after_s < 5
    assert growth < 20 * MB


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/v1/jobs", 32 * 1024),
        ("/v1/jobs/{job}/progress", 32 * 1024),
        ("/v1/jobs/{job}/complete", 32 * 1024),
        ("/v1/jobs/{job}/fail", 32 * 1024),
        ("/v1/jobs/{job}/cancel", 32 * 1024),
        ("/v1/progress", MB),
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_every_route_caps_its_body_and_stores_nothing(
    server: ServerProcess, worker_token: str, path: str, limit: int, chunked: bool
) -> None:
    job = new_id()
    auth = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth) as client:
        assert (await client.post("/v1/jobs", json={"job_id": job, "owner": "alice"})).status_code == 201
        before = (await client.get(f"/v1/jobs/{job}")).json()
        # A valid shape padded with whitespace past the cap: only the size is wrong.
        body = json.dumps({"job_id": new_id(), "owner": "alice"}).encode()
        if "progress" in path and path != "/v1/progress":
            body = json.dumps({"phase": "GENERATING", "phase_progress": 50}).encode()
        oversized = body[:-1] + b" " * (limit - len(body) + 1) + b"}"
        assert len(oversized) == limit + 1

        async def stream() -> AsyncIterator[bytes]:
            for start in range(0, len(oversized), 8192):
                yield oversized[start:start + 8192]

        content: Any = stream() if chunked else oversized
        reply = await client.post(path.format(job=job), content=content,
                                  headers={"Content-Type": "application/json"})
        assert reply.status_code == 413, reply.text
        assert reply.json()["error"]["code"] == "too_large"
        assert str(limit) in reply.json()["error"]["message"]
        assert (await client.get(f"/v1/jobs/{job}")).json() == before
        # At the cap exactly, the size is fine (the body may still be refused for what it says).
        at_cap = oversized[: limit - 1] + b"}"
        reply = await client.post(path.format(job=job), content=at_cap,
                                  headers={"Content-Type": "application/json"})
        assert reply.status_code != 413, reply.text


@pytest.fixture(scope="module")
def webhook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the RunPod integration on (pointed at a port where nothing listens:
    only the webhook route is exercised)."""
    folder = tmp_path_factory.mktemp("webhook")
    env = {
        "PHASECAST_RUNPOD_ENDPOINT": "hostile-endpoint",
        "PHASECAST_RUNPOD_API_KEY": "hostile-key",
        "PHASECAST_RUNPOD_BASE_URL": f"http://127.0.0.1:{free_port()}/v2",
        "PHASECAST_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    with ServerProcess(f"sqlite:///{folder / 'phasecast.db'}", env=env, log_path=folder / "server.log") as found:
        yield found


@pytest.mark.parametrize("signed", [False, True], ids=["bad-token", "signed"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_webhook_refuses_a_50_mb_body_before_reading_it(
    webhook_server: ServerProcess, signed: bool, chunked: bool
) -> None:
    job, step = new_id(), "panel-1"
    token = webhook_token(WEBHOOK_SECRET, job, step) if signed else "0" * 64
    before = rss_bytes(webhook_server.pid)
    result = send_big_body(webhook_server.port, f"{WEBHOOK_PATH}?job={job}&step={step}&token={token}",
                           50 * MB, {}, chunked=chunked)
    growth = rss_bytes(webhook_server.pid) - before
    print(f"\nwebhook, 50 MB {'chunked' if chunked else 'Content-Length'}, "
          f"{'signed' if signed else 'bad token'}: {result.status} after "
          f"{result.answered_after_s * 1000:.1f} ms, RSS grew {growth / MB:.2f} MB")
    assert result.status == (413 if signed else 403)
    assert error_of(result.body)["code"] == ("too_large" if signed else "forbidden")
    assert result.sent_when_answered < 50 * MB
    assert growth < 20 * MB


async def test_a_token_is_checked_before_the_body_is_parsed(server: ServerProcess) -> None:
    """Even a small malformed body gets 401, not 400 or 422, without a token."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        for path in ("/v1/jobs", "/v1/progress", f"/v1/jobs/{new_id()}/progress"):
            reply = await client.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
            assert reply.status_code == 401, (path, reply.text)
            assert reply.json()["error"]["code"] == "unauthorized"
            assert reply.headers["www-authenticate"] == "Bearer"
