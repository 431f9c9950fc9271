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
from urllib.parse import quote

import httpx
import pytest
from tests.support.clients import WSWatcher
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


def send_big_head(port: int, first: bytes, total: int, *, after: bytes = b"") -> tuple[bytes, int]:
    """Send ``after`` (a complete request, answered first) then a request head of ``total``
    bytes of headers, as fast as the server takes them; the answer to it (or b"" if the
    connection closed without one) and how many head bytes were sent by then."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    try:
        if after:
            sock.sendall(after)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                answer += sock.recv(65536)
        sock.sendall(first)
        line = b"X-Padding: " + b"p" * 1000 + b"\r\n"
        sent = 0
        sock.setblocking(False)
        received = b""
        while sent < total:
            try:
                sent += sock.send(line * 64)
            except BlockingIOError:
                ready, _, _ = select.select([sock], [sock], [], 5)
                if not ready:
                    break
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            received += chunk
            if not chunk or b"\r\n\r\n" in received:
                break
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            while not received.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        return received, sent
    finally:
        sock.close()


@pytest.mark.parametrize("path", ["/healthz", "/v1/jobs", "/v1/progress"])
def test_a_request_head_over_64_kib_is_refused_with_431_before_it_is_kept(
    server: ServerProcess, path: str
) -> None:
    """The HTTP parser keeps a request's headers whatever their size: 20 MB of them were
    read, kept and answered 200 (the server's memory grew with them). Now the head is capped
    at 64 KiB: 431 ``headers_too_large`` and the connection closed, on a fresh connection
    and on one that served a request before."""
    before = rss_bytes(server.pid)
    method = b"POST" if path != "/healthz" else b"GET"
    first = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method, path.encode())
    plain = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for after in (b"", plain):
        answer, sent = send_big_head(server.port, first, 20 * MB, after=after)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert error_of(answer.split(b"\r\n\r\n", 1)[1])["code"] == "headers_too_large"
        assert sent < 20 * MB
    assert rss_bytes(server.pid) - before < 10 * MB
    # Ordinary heads (a JWT, a few dozen headers) are far from it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: %s\r\n" % (b"a" * 8000) * 6 + b"\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
        b"GET /v1/jobs/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["not-http", "version-9.9", "space-in-name", "two-lengths", "100k-path"],
)
def test_bytes_the_http_parser_refuses_get_a_json_400(server: ServerProcess, raw: bytes) -> None:
    """What the HTTP parser refuses never reaches the application; it was answered in
    uvicorn's plain text. Now the same 400 carries the JSON error body every other refusal
    has, and the connection closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    error = error_of(body)
    assert error["code"] == "bad_request" and "HTTP/1.1" in error["message"]


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


async def test_a_request_with_two_credentials_is_refused_on_every_path(
    server: ServerProcess, worker_token: str, make_token: Any
) -> None:
    """Two Authorization headers, ``access_token`` twice, or a token in the header and the
    URL: which one counts would depend on who reads the request (a proxy may check one, the
    server use another), so none does: 401 naming the problem, nothing stored. (Before:
    the REST routes took the first header, the thin report path the last.)"""
    job_id = new_id("two-tokens")
    viewer = make_token("alice")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        created = await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"},
                                    headers={"Authorization": f"Bearer {worker_token}"})
        assert created.status_code == 201, created.text
        two = [("Authorization", f"Bearer {viewer}"), ("Authorization", f"Bearer {worker_token}")]
        report = b'{"phase": "ANALYZING", "phase_progress": 50}'
        cases: list[tuple[str, str, list[tuple[str, str]], bytes | None, str]] = [
            ("GET", f"/v1/jobs/{job_id}", two, None, "Authorization headers"),
            ("GET", "/v1/jobs", two, None, "Authorization headers"),
            ("POST", f"/v1/jobs/{job_id}/progress", [*two, ("Content-Type", "application/json")], report,
             "Authorization headers"),
            ("POST", "/v1/progress", [*two, ("Content-Type", "application/json")],
             b'{"updates": [{"job_id": "%s", "phase": "ANALYZING"}]}' % job_id.encode(), "Authorization headers"),
            ("GET", f"/v1/jobs/{job_id}/events?access_token={viewer}&access_token={viewer}", [], None,
             "more than once"),
            ("GET", f"/v1/events?job={job_id}&access_token={viewer}", [("Authorization", f"Bearer {viewer}")],
             None, "in one place"),
            ("GET", f"/v1/jobs/{job_id}/events?access_token={viewer}", [("Authorization", f"Bearer {viewer}")],
             None, "in one place"),
        ]
        for method, path, headers, body, says in cases:
            reply = await client.request(method, path, headers=httpx.Headers(headers), content=body)
            assert reply.status_code == 401, (method, path, reply.status_code, reply.text)
            error = reply.json()["error"]
            assert error["code"] == "unauthorized" and says in error["message"], (path, error)
        stored = (await client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {viewer}"})).json()
        assert stored["seq"] == 1 and stored["phase"] == "QUEUED"  # no report was applied


# --- 2. What is stored can always be read back, by every path --------------------------------


def strict_json(text: str | bytes) -> Any:
    """Parse as a browser's JSON.parse would: NaN and Infinity are errors."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def nested(depth: int) -> dict[str, Any]:
    """A metadata object nested ``depth`` levels deep, the object itself being level 1."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


# Inputs at the edges of what is accepted: each job must be readable by every path after.
ACCEPTED_METADATA: dict[str, Any] = {
    "depth-32": nested(32),
    "big-numbers": {"big": 2**63, "neg": -(2**70), "tiny": 5e-324, "huge": 1.7976931348623157e308, "negzero": -0.0},
    "unicode": {"astral": "😀 𝄞", "rtl": "مرحبا", "controls": "a\u0001\u001f\u007fb", "newline": "line\nbreak", "": "empty key",
                "quote": "\"'\\</script>"},
    "near-16k": {"blob": "x" * (16 * 1024 - 20)},
    "empty-containers": {"o": {}, "a": [], "nested": [[], {}, [[]]]},
    "arrays": {"mixed": [1, "two", 3.5, None, True, False, {"k": [1]}]},
}
ACCEPTED_IDS = ["a", "A" * 128, "job:history", "x.y_z-1", "9:9:9", "job:changes"]


async def read_everywhere(server: ServerProcess, token: str, job_id: str, owner: str) -> dict[str, Any]:
    """Read one job by every read path and check each agrees and is strict JSON; return the
    state."""
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        single = await client.get(f"/v1/jobs/{job_id}")
        assert single.status_code == 200, single.text
        state = strict_json(single.content)
        for url in (f"/v1/jobs?owner={owner}&limit=1000", "/v1/jobs?limit=1000", f"/v1/jobs?owner={owner}&status=active"):
            listed = await client.get(url)
            assert listed.status_code == 200, (url, listed.text)
            found = [job for job in strict_json(listed.content)["jobs"] if job["job_id"] == job_id]
            if "active" not in url or state["phase"] not in ("COMPLETE", "FAILED", "CANCELLED"):
                assert found == [state], url
        history = await client.get(f"/v1/jobs/{job_id}/history")
        assert history.status_code == 200, history.text
        assert strict_json(history.content)["events"]
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    assert strict_json(line[5:].strip())["seq"] == state["seq"]
                    break
    watcher = await WSWatcher(server.url, token).connect()
    try:
        await watcher.subscribe(job_id)
        received = await watcher.wait_seq(job_id, state["seq"])
        json.dumps(received.state, allow_nan=False)  # no NaN or Infinity came over the wire
        assert received.state == state
    finally:
        await watcher.close()
    return state


async def test_every_accepted_input_can_be_read_updated_and_streamed_by_every_path(
    server: ServerProcess, worker_token: str
) -> None:
    owner = new_id("owner")
    auth = {"Authorization": f"Bearer {worker_token}"}
    jobs: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        for name, metadata in ACCEPTED_METADATA.items():
            job_id = new_id(name)
            reply = await client.post("/v1/jobs", json={"job_id": job_id, "owner": owner, "metadata": metadata})
            assert reply.status_code == 201, (name, reply.text)
            jobs[job_id] = metadata
        # Raw UTF-8 and an escaped surrogate pair are the same text.
        job_id = new_id("escaped")
        raw = ('{"job_id": "' + job_id + '", "owner": "' + owner
               + '", "metadata": {"e": "\\ud83d\\ude00", "r": "\U0001f600"}}').encode()
        reply = await client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert reply.status_code == 201, reply.text
        jobs[job_id] = {"e": "😀", "r": "😀"}
        prefix = uuid.uuid4().hex[:8]
        for special in ACCEPTED_IDS:
            job_id = (prefix + special)[:128] if special != "a" else prefix
            reply = await client.post("/v1/jobs", json={"job_id": job_id, "owner": owner})
            assert reply.status_code == 201, (special, reply.text)
            jobs[job_id] = {}
        for job_id in jobs:
            reply = await client.post(f"/v1/jobs/{job_id}/progress",
                                      json={"phase": "GENERATING", "step": "p-1", "step_progress": 50,
                                            "steps_total": 2, "message": "Drawing 😀 \u0001"})
            assert reply.status_code == 200, reply.text
            assert reply.json()["applied"] is True
    for job_id, metadata in jobs.items():
        state = await read_everywhere(server, worker_token, job_id, owner)
        assert state["metadata"] == metadata
        assert state["message"] == "Drawing 😀 \u0001"
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        for job_id in jobs:
            reply = await client.post(f"/v1/jobs/{job_id}/complete")
            assert reply.status_code == 200, reply.text
    for job_id, metadata in jobs.items():
        assert (await read_everywhere(server, worker_token, job_id, owner))["metadata"] == metadata


def raw_create(job_id: str, metadata_json: str) -> bytes:
    return f'{{"job_id": "{job_id}", "owner": "alice", "metadata": {metadata_json}}}'.encode()


REFUSED_CREATES: dict[str, tuple[str, int, str, str | None]] = {
    # name: (metadata as raw JSON text, status, code, field)
    "nan": ('{"a": NaN}', 422, "invalid", "metadata.a"),
    "infinity": ('{"a": [1, Infinity]}', 422, "invalid", "metadata.a.1"),
    "minus-infinity": ('{"a": -Infinity}', 422, "invalid", "metadata.a"),
    "overflow-literal": ('{"a": 1e400}', 422, "invalid", "metadata.a"),
    "lone-surrogate-value": ('{"a": "\\ud800"}', 422, "invalid", "metadata.a"),
    "lone-surrogate-key": ('{"\\udfff": 1}', 422, "invalid", "metadata.\\udfff"),
    # PostgreSQL (the archive) keeps no NUL: refused, not stored and then never archived.
    "nul-value": ('{"a": ["ok", "x\\u0000y"]}', 422, "invalid", "metadata.a.1"),
    "nul-key": ('{"a": {"k\\u0000": 1}}', 422, "invalid", "metadata.a.k\u0000"),
    "reversed-pair": ('{"a": "\\ude00\\ud83d"}', 422, "invalid", "metadata.a"),
    "depth-33": (json.dumps(nested(33)), 422, "invalid", "metadata" + ".n" * 31 + ".n"),
    "depth-5000": ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", 422, "invalid", None),
    "not-an-object": ("[1, 2]", 422, "invalid", "metadata"),
    "too-big": (json.dumps({"blob": "x" * (16 * 1024)}), 422, "invalid", "metadata"),
    # Readers disagree on which value of a repeated key wins: refused, with the key's path.
    "repeated-key": ('{"a": {"b": 1, "b": 2}}', 422, "invalid", "metadata.a.b"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CREATES))
async def test_a_refused_create_names_the_field_and_stores_nothing(
    server: ServerProcess, worker_token: str, case: str
) -> None:
    metadata, status, code, field = REFUSED_CREATES[case]
    job_id = new_id(case)
    auth = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        reply = await client.post("/v1/jobs", content=raw_create(job_id, metadata),
                                  headers={"Content-Type": "application/json"})
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert error["code"] == code and error["message"]
        if field is not None:
            assert error.get("field") == field, error
        assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404
        listed = (await client.get("/v1/jobs?owner=alice&limit=1000")).json()["jobs"]
        assert job_id not in {job["job_id"] for job in listed}
        # The same id is free: a retry with good metadata is created, not a 409.
        assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201


REFUSED_REPORTS: dict[str, tuple[str, str]] = {
    # name: (raw JSON body of a progress report, field)
    "string-number": ('{"phase": "GENERATING", "phase_progress": "50"}', "phase_progress"),
    "true-number": ('{"phase": "GENERATING", "phase_progress": true}', "phase_progress"),
    "false-step-progress": ('{"phase": "GENERATING", "step": "p1", "step_progress": false}', "step_progress"),
    "nan-progress": ('{"phase": "GENERATING", "phase_progress": NaN}', "phase_progress"),
    "infinite-progress": ('{"phase": "GENERATING", "phase_progress": 1e999}', "phase_progress"),
    "fractional-steps-total": ('{"phase": "GENERATING", "step": "p1", "steps_total": 2.5}', "steps_total"),
    "null-message": ('{"phase": "GENERATING", "message": null}', "message"),
    "string-steps-total": ('{"phase": "GENERATING", "step": "p1", "steps_total": "2"}', "steps_total"),
    "bool-steps-total": ('{"phase": "GENERATING", "step": "p1", "steps_total": true}', "steps_total"),
    "surrogate-message": ('{"phase": "GENERATING", "message": "\\udc00"}', "message"),
    "nul-message": ('{"phase": "GENERATING", "message": "a\\u0000b"}', "message"),
    "number-message": ('{"phase": "GENERATING", "message": 5}', "message"),
    "step-newline": ('{"phase": "GENERATING", "step": "p1\\n", "step_progress": 5}', "step"),
    "step-status-alone": ('{"phase": "GENERATING", "step_status": "done"}', "step"),
    "step-progress-alone": ('{"phase": "GENERATING", "step_progress": 5}', "step"),
    "terminal-phase": ('{"phase": "COMPLETE"}', "phase"),
    "lowercase-phase": ('{"phase": "generating"}', "phase"),
    "null-phase": ('{"phase": null}', "phase"),
    "repeated-phase": ('{"phase": "ANALYZING", "phase": "GENERATING"}', "phase"),
    "repeated-progress": ('{"phase": "GENERATING", "phase_progress": 10, "phase_progress": 90}', "phase_progress"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_REPORTS))
async def test_a_refused_report_names_the_field_and_changes_nothing(
    server: ServerProcess, worker_token: str, case: str
) -> None:
    body, field = REFUSED_REPORTS[case]
    job_id = new_id(case)
    auth = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
        before = (await client.get(f"/v1/jobs/{job_id}")).json()
        for path, content in ((f"/v1/jobs/{job_id}/progress", body.encode()),
                              ("/v1/progress", f'{{"updates": [{{"job_id": "{job_id}", {body[1:]}]}}'.encode())):
            reply = await client.post(path, content=content, headers={"Content-Type": "application/json"})
            assert reply.status_code == 422, (path, reply.text)
            error = reply.json()["error"]
            assert error["code"] == "invalid"
            expected = field if path != "/v1/progress" else f"updates.0.{field}"
            assert error.get("field") == expected, (path, error)
        assert (await client.get(f"/v1/jobs/{job_id}")).json() == before


# Every text a job keeps, with a NUL in it (PostgreSQL, the archive, cannot keep one).
NUL_TEXTS: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (path after /v1/jobs/<id>, body, field)
    "owner": ("", {"owner": "al\u0000ice"}, "owner"),
    "complete-message": ("/complete", {"message": "Ready\u0000"}, "message"),
    "fail-code": ("/fail", {"error": {"code": "oom\u0000", "message": "out of memory"}}, "error.code"),
    "fail-message": ("/fail", {"error": {"code": "oom", "message": "out of\u0000memory"}}, "error.message"),
    "cancel-reason": ("/cancel", {"reason": "\u0000"}, "reason"),
}


@pytest.mark.parametrize("case", sorted(NUL_TEXTS))
async def test_a_nul_in_any_text_a_job_keeps_is_refused_and_changes_nothing(
    server: ServerProcess, worker_token: str, case: str
) -> None:
    path, body, field = NUL_TEXTS[case]
    job_id = new_id(f"nul-{case}")
    auth = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        if path:
            assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
            before = (await client.get(f"/v1/jobs/{job_id}")).json()
            reply = await client.post(f"/v1/jobs/{job_id}{path}", json=body)
        else:
            reply = await client.post("/v1/jobs", json={"job_id": job_id, **body})
        assert reply.status_code == 422, reply.text
        error = reply.json()["error"]
        assert error["code"] == "invalid" and error.get("field") in (field, f"body.{field}"), error
        assert "NUL" in error["message"], error
        if path:
            assert (await client.get(f"/v1/jobs/{job_id}")).json() == before
        else:
            assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404


# --- 3. One job id pattern, everywhere ---------------------------------------------------------

BAD_IDS = ["abc\n", "abc\r\n", " abc", "abc def", "-abc", ".abc", "a" * 129, "a/b", "a{b}", "é", "a\u0000", "a%b"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:24] for b in BAD_IDS])
async def test_a_bad_job_id_is_refused_on_every_path(
    server: ServerProcess, worker_token: str, make_token: Any, bad: str
) -> None:
    auth = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        reply = await client.post("/v1/jobs", json={"job_id": bad, "owner": "alice"})
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"]["field"] == "job_id"
        assert "letters, digits" in reply.json()["error"]["message"]
        reply = await client.post("/v1/progress", json={"updates": [{"job_id": bad, "phase": "GENERATING"}]})
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"]["field"] == "updates.0.job_id"
        if "/" not in bad:
            quoted = "/v1/jobs/" + quote(bad, safe="")
            for method, path in (("GET", ""), ("GET", "/history"), ("POST", "/progress"), ("POST", "/complete"),
                                 ("POST", "/cancel"), ("GET", "/events")):
                body = {"phase": "GENERATING"} if path == "/progress" else None
                reply = await client.request(method, quoted + path, json=body)
                assert reply.status_code == 422, (method, path, reply.text)
                assert reply.json()["error"]["field"] == "job_id"
    watcher = await WSWatcher(server.url, make_token("alice")).connect()
    try:
        await watcher.subscribe(bad)
        error = await watcher.wait_message("error", code="invalid")
        assert "job_id" in error["message"]
    finally:
        await watcher.close()


# --- 4. Protocol edges: every malformed request gets its documented 4xx ---------------------


MALFORMED: dict[str, tuple[str, str, bytes, dict[str, str], int, str]] = {
    # name: (method, path ({job} is a job of the test), body, headers, status, code)
    "not-utf8": ("POST", "/v1/jobs/{job}/progress", b'{"phase": "GENERATING", "message": "\xff\xfe"}',
                 {"Content-Type": "application/json"}, 400, "invalid_json"),
    "latin1-body": ("POST", "/v1/jobs", '{"owner": "Zoë"}'.encode("latin-1"),
                    {"Content-Type": "application/json"}, 400, "invalid_json"),
    "truncated": ("POST", "/v1/progress", b'{"updates": [', {"Content-Type": "application/json"}, 400, "invalid_json"),
    "trailing-garbage": ("POST", "/v1/jobs", b'{} {}', {"Content-Type": "application/json"}, 400, "invalid_json"),
    "array-body": ("POST", "/v1/jobs", b"[]", {"Content-Type": "application/json"}, 422, "invalid"),
    "string-body": ("POST", "/v1/jobs/{job}/progress", b'"GENERATING"', {"Content-Type": "application/json"}, 422, "invalid"),
    "fail-without-code": ("POST", "/v1/jobs/{job}/fail", b'{"error": {"message": "x"}}', {}, 422, "invalid"),
    "text-plain": ("POST", "/v1/jobs/{job}/complete", b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    "form": ("POST", "/v1/jobs", b"owner=alice", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
             "unsupported_media_type"),
    "multipart": ("POST", "/v1/progress", b"--x--", {"Content-Type": "multipart/form-data; boundary=x"}, 415,
                  "unsupported_media_type"),
    "limit-not-a-number": ("GET", "/v1/jobs?limit=ten", b"", {}, 422, "invalid"),
    "limit-float": ("GET", "/v1/jobs?limit=1e3", b"", {}, 422, "invalid"),
    "limit-zero": ("GET", "/v1/jobs/{job}/history?limit=0", b"", {}, 422, "invalid"),
    "status-unknown": ("GET", "/v1/jobs?status=done", b"", {}, 422, "invalid"),
    "trace": ("TRACE", "/v1/jobs", b"", {}, 405, "method_not_allowed"),
    "delete-job": ("DELETE", "/v1/jobs/{job}", b"", {}, 405, "method_not_allowed"),
    "put-progress": ("PUT", "/v1/jobs/{job}/progress", b"{}", {"Content-Type": "application/json"}, 405,
                     "method_not_allowed"),
    "unknown-path": ("GET", "/v1/nothing-here", b"", {}, 404, "not_found"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_request_gets_its_documented_status(
    server: ServerProcess, worker_token: str, case: str
) -> None:
    method, path, body, headers, status, code = MALFORMED[case]
    job_id = new_id(case)
    auth = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
        before = (await client.get(f"/v1/jobs/{job_id}")).json()
        reply = await client.request(method, path.format(job=job_id), content=body, headers=headers)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert error["code"] == code and error["message"]
        if status == 405:
            allowed = {m.strip() for m in reply.headers["allow"].split(",")}
            assert allowed and method not in allowed
        if status == 415:
            assert headers["Content-Type"].split(";")[0] in error["message"]
        assert (await client.get(f"/v1/jobs/{job_id}")).json() == before


async def test_every_get_path_answers_head_and_allow_names_only_what_is_served(
    server: ServerProcess, worker_token: str
) -> None:
    """RFC 9110: HEAD is the GET's status and headers without the body. It was refused 405
    on every path while the 405's own ``Allow`` named it. The event streams, whose response
    never ends, refuse HEAD with ``Allow: GET``; no ``Allow`` names a method that is then
    refused. Each HEAD is followed by a GET on the same connection: a body sent after a HEAD
    would garble that GET's response."""
    job_id = new_id("head")
    auth = {"Authorization": f"Bearer {worker_token}"}
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10, limits=limits) as client:
        assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
        stable = ["/healthz", "/", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/history", "/openapi.json",
                  f"/v1/jobs/{job_id}-missing", "/v1/nothing-here", "/docs"]
        for path in [*stable, "/readyz", "/metrics", "/v1/jobs?owner=alice"]:
            head = await client.head(path)
            get = await client.get(path)
            assert head.status_code == get.status_code, (path, head.status_code, get.status_code)
            assert head.content == b"", path
            assert head.headers.get("content-type") == get.headers.get("content-type"), path
            if path in stable:
                assert head.headers.get("content-length") == get.headers.get("content-length"), path
        for path in (f"/v1/jobs/{job_id}/events", f"/v1/events?job={job_id}"):
            reply = await client.head(path)
            assert reply.status_code == 405 and reply.headers["allow"] == "GET", (path, reply.headers)
        for method, path in (("HEAD", "/v1/progress"), ("PUT", f"/v1/jobs/{job_id}/progress"),
                             ("DELETE", f"/v1/jobs/{job_id}"), ("POST", "/healthz")):
            reply = await client.request(method, path)
            assert reply.status_code == 405, (method, path, reply.status_code)
            for allowed in (m.strip() for m in reply.headers["allow"].split(",")):
                answered = await client.request(allowed, path, content=b"{}" if allowed == "POST" else None,
                                                headers={"Content-Type": "application/json"})
                assert answered.status_code != 405, (allowed, path)


async def test_complete_fail_and_cancel_take_an_empty_body_or_one_without_content_type(
    server: ServerProcess, worker_token: str
) -> None:
    auth = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=10) as client:
        for ending, phase in (("complete", "COMPLETE"), ("fail", "FAILED"), ("cancel", "CANCELLED")):
            for content, headers in ((b"", {}), (b"{}", {}), (b"", {"Content-Type": "application/json"}),
                                     (b"{}", {"Content-Type": "application/json; charset=utf-8"})):
                job_id = new_id(ending)
                assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
                reply = await client.post(f"/v1/jobs/{job_id}/{ending}", content=content, headers=headers)
                assert reply.status_code == 200, (ending, content, headers, reply.text)
                assert reply.json()["state"]["phase"] == phase
                if ending == "fail":
                    assert reply.json()["state"]["error"]["code"] == "unspecified"
        # A message without Content-Type is read as JSON too.
        job_id = new_id("complete")
        assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
        reply = await client.post(f"/v1/jobs/{job_id}/complete", content=b'{"message": "Ready"}')
        assert reply.json()["state"]["message"] == "Ready"


# --- 6. Scope on every read path ---------------------------------------------------------------


async def test_a_token_without_a_read_scope_reads_nothing(
    server: ServerProcess, worker_token: str, make_token: Any
) -> None:
    job_id = new_id("scope")
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {worker_token}"}) as client:
        assert (await client.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201
    billing = make_token("alice", ("billing:read",))
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {billing}"}) as client:
        for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/jobs?owner=alice"), ("GET", "/v1/jobs?status=active"),
                             ("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/history"),
                             ("GET", f"/v1/jobs/{job_id}/events"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                             ("POST", f"/v1/jobs/{job_id}/progress")):
            body = {"phase": "GENERATING"} if path.endswith("/progress") else None
            reply = await client.request(method, path, json=body)
            assert reply.status_code == 403, (method, path, reply.text)
            assert reply.json()["error"]["code"] == "forbidden"
            assert job_id not in reply.text or "belongs" in reply.text
    reader = make_token("alice", ("jobs:read",))
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {reader}"}) as client:
        listed = (await client.get("/v1/jobs?limit=1000")).json()["jobs"]
        assert job_id in {job["job_id"] for job in listed}


# --- 8. /docs works without internet -----------------------------------------------------------


async def test_the_api_docs_use_only_local_assets(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            assert "http://" not in html and "https://" not in html.replace("https://fastapi.tiangolo.com", ""), html
            assets = [part.split("'")[0].split('"')[0] for part in html.replace("'", '"').split('"')
                      if part.startswith("/") and part.rsplit(".", 1)[-1] in ("js", "css", "png")]
            assert assets, html
            for asset in assets:
                reply = await client.get(asset)
                assert reply.status_code == 200, asset
                assert len(reply.content) > 100
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "Phasecast"


def test_a_client_that_waits_for_100_continue_is_refused_without_sending_its_body(
    server: ServerProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 52428800\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer  # no "100 Continue": the body is never asked for
