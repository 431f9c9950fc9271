"""The thin path for progress reports (``server/ingest.py``) answers exactly what the full
route would, and leaves everything it does not plainly accept to the full route.

Every test runs on both engines and on both places the thin path runs: ``raw`` (the HTTP
protocol of ``phasecast serve``) and ``asgi`` (the outermost ASGI layer), selected with
``PHASECAST_INGEST_TRANSPORT``; a test checks from the metrics that each server answered on
the path it was given."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import engine_variants, module_server_on
from tests.support.process import ServerProcess

from phasecast.model import Phase, ProgressUpdate
from phasecast.server.ingest import MAX_THIN_BODY, _batch, _update

TRANSPORTS = ("raw", "asgi")


@pytest.fixture(scope="module", params=engine_variants(TRANSPORTS))
def thin_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    engine, transport = request.param
    env = {"PHASECAST_INGEST_TRANSPORT": transport}
    with module_server_on(engine, tmp_path_factory.mktemp("server"), env) as process:
        process.transport = transport  # type: ignore[attr-defined]
        yield process


@pytest.fixture
async def api(thin_server: ServerProcess, worker_token: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=thin_server.url, headers=headers) as client:
        yield client


async def new_job(api: httpx.AsyncClient) -> str:
    job_id = f"thin-{uuid.uuid4().hex[:10]}"
    created = await api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})
    assert created.status_code == 201
    return job_id


async def test_a_report_is_answered_with_the_stored_state_byte_for_byte(api: httpx.AsyncClient) -> None:
    job_id = await new_job(api)
    body = {"phase": "GENERATING", "phase_progress": 12.3456, "message": "Zeichnen ✏️ \"3\"\n"}
    reply = await api.post(f"/v1/jobs/{job_id}/progress", json=body)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert int(reply.headers["content-length"]) == len(reply.content)
    stored = await api.get(f"/v1/jobs/{job_id}")
    assert reply.content == b'{"applied":true,"state":' + stored.content + b"}"
    state = reply.json()["state"]
    assert (state["seq"], state["phase_progress"], state["message"]) == (2, 12.3456, body["message"])
    # The same report again is acknowledged and changes nothing.
    again = await api.post(f"/v1/jobs/{job_id}/progress", json=body)
    assert again.content == b'{"applied":false,"state":' + stored.content + b"}"
    steps = await api.post(f"/v1/jobs/{job_id}/progress",
                           json={"phase": "GENERATING", "step": "panel-1", "step_progress": 50})
    assert steps.json()["state"]["steps"] == {"panel-1": {"progress": 50.0, "status": "running"}}


async def test_errors_of_the_rules_are_the_routes_errors(api: httpx.AsyncClient) -> None:
    missing = await api.post("/v1/jobs/no-such-job/progress", json={"phase": "GENERATING"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    job_id = await new_job(api)
    assert (await api.post(f"/v1/jobs/{job_id}/complete", json={})).status_code == 200
    ended = await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "GENERATING"})
    assert ended.status_code == 409 and ended.json()["error"]["code"] == "terminal"


async def test_what_the_thin_path_does_not_take_gets_the_full_routes_answer(
    api: httpx.AsyncClient, make_token: object
) -> None:
    job_id = await new_job(api)
    before = (await api.get(f"/v1/jobs/{job_id}")).json()
    url = f"/v1/jobs/{job_id}/progress"
    reader = make_token("alice", ("jobs:read",))  # type: ignore[operator]
    forbidden = await api.post(url, json={"phase": "GENERATING"}, headers={"Authorization": f"Bearer {reader}"})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    unauthorised = await api.post(url, json={"phase": "GENERATING"}, headers={"Authorization": "Bearer x.y.z"})
    assert unauthorised.status_code == 401
    for bad in ('{"phase":"GENERATING","phase_progress":101}', '{"phase":"COMPLETE"}',
                '{"phase":"GENERATING","surprise":1}', '{"phase":"GENERATING"', "[]"):
        reply = await api.post(url, content=bad, headers={"Content-Type": "application/json"})
        assert 400 <= reply.status_code < 500, bad
        assert "error" in reply.json(), bad
    assert (await api.get(f"/v1/jobs/{job_id}")).json() == before
    # A valid report the thin path leaves alone (a large body) is still applied by the route.
    padded = json.dumps({"phase": "GENERATING", "phase_progress": 5}) + " " * MAX_THIN_BODY
    applied = await api.post(url, content=padded, headers={"Content-Type": "application/json"})
    if applied.status_code != 413:  # unless the route's own body cap is below this size
        assert applied.status_code == 200 and applied.json()["state"]["phase_progress"] == 5.0


DOUBTFUL_BODIES = [
    b'{"phase":"GENERATING","phase_progress":"50"}',
    b'{"phase":"GENERATING","phase_progress":true}',
    b'{"phase":"GENERATING","phase_progress":NaN}',
    b'{"phase":"GENERATING","phase_progress":1e400}',
    b'{"phase":"GENERATING","phase_progress":-0.5}',
    b'{"phase":"GENERATING","steps_total":0}',
    b'{"phase":"GENERATING","steps_total":2.0}',
    b'{"phase":"GENERATING","steps_total":true}',
    b'{"phase":"GENERATING","step":"bad id"}',
    b'{"phase":"GENERATING","step":"ok\\n"}',
    b'{"phase":"GENERATING","step_status":"done"}',
    b'{"phase":"GENERATING","step_progress":5}',
    b'{"phase":"GENERATING","step":"a","phase_progress":5}',
    b'{"phase":"GENERATING","step":"a","step_status":"stuck"}',
    b'{"phase":"GENERATING","message":"\\ud800"}',
    b'{"phase":"GENERATING","message":5}',
    b'{"phase":["GENERATING"]}',
    b'{"phase":"FAILED"}',
    b'{"phase":"GENERATING","extra":null}',
    b'{"phase_progress":5}',
    b"[1]",
    b"\xff",
    ]


@pytest.mark.parametrize("body", DOUBTFUL_BODIES)
def test_the_thin_path_leaves_anything_doubtful_to_the_route(body: bytes) -> None:
    assert _update(body) is None


def test_the_thin_path_reads_plain_reports_as_the_route_does() -> None:
    assert _update(b'{"phase":"ANALYZING","phase_progress":40,"message":"m"}') == ProgressUpdate(
        Phase.ANALYZING, phase_progress=40.0, message="m"
    )
    assert _update(
        b'{"phase":"GENERATING","step":"p-1","step_progress":0.5,"step_status":"running","steps_total":6}'
    ) == ProgressUpdate(Phase.GENERATING, step="p-1", step_progress=0.5, step_status="running", steps_total=6)
    assert _update(b'{"phase":"QUEUED","message":"x' + b"y" * 499 + b'"}') is not None
    assert _update(b'{"phase":"QUEUED","message":"x' + b"y" * 500 + b'"}') is None


async def test_a_plain_batch_is_answered_as_the_batch_route_answers(api: httpx.AsyncClient) -> None:
    first, second = await new_job(api), await new_job(api)
    updates = [
        {"job_id": first, "phase": "ANALYZING", "phase_progress": 10},
        {"job_id": second, "phase": "GENERATING", "step": "p-1", "step_progress": 50, "steps_total": 2},
        {"job_id": first, "phase": "ANALYZING", "phase_progress": 20, "message": "ü"},
        {"job_id": first, "phase": "ANALYZING", "phase_progress": 15},  # late: not applied
        {"job_id": "thin-missing", "phase": "ANALYZING"},
    ]
    reply = await api.post("/v1/progress", json={"updates": updates})
    assert reply.status_code == 200
    # Encoded as json.dumps encodes (the thin path writes the results by hand).
    assert reply.content == json.dumps(reply.json(), separators=(",", ":"), ensure_ascii=False).encode()
    results = reply.json()["results"]
    one = (await api.get(f"/v1/jobs/{first}")).json()
    two = (await api.get(f"/v1/jobs/{second}")).json()
    assert results[:4] == [
        {"job_id": first, "applied": True, "seq": 2, "phase": "ANALYZING", "progress": 1.0},
        {"job_id": second, "applied": True, "seq": 2, "phase": "GENERATING", "progress": two["progress"]},
        {"job_id": first, "applied": True, "seq": 3, "phase": "ANALYZING", "progress": one["progress"]},
        {"job_id": first, "applied": False, "seq": 3, "phase": "ANALYZING", "progress": one["progress"]},
    ]
    assert results[4]["job_id"] == "thin-missing" and results[4]["error"]["code"] == "not_found"
    assert (one["seq"], one["message"], two["steps"]["p-1"]["progress"]) == (3, "ü", 50.0)


async def test_a_batch_with_one_doubtful_report_is_judged_whole_by_the_route(api: httpx.AsyncClient) -> None:
    job_id = await new_job(api)
    updates = [{"job_id": job_id, "phase": "ANALYZING", "phase_progress": 10},
               {"job_id": job_id, "phase": "ANALYZING", "phase_progress": "20"}]
    reply = await api.post("/v1/progress", json={"updates": updates})
    assert reply.status_code == 422
    assert "updates.1" in reply.json()["error"]["field"]
    assert (await api.get(f"/v1/jobs/{job_id}")).json()["seq"] == 1  # nothing applied


def test_the_thin_path_takes_plain_batches_and_leaves_the_rest() -> None:
    plain = b'{"updates":[{"job_id":"a","phase":"QUEUED","phase_progress":1},{"job_id":"b","phase":"ANALYZING"}]}'
    assert _batch(plain) == [("a", ProgressUpdate(Phase.QUEUED, phase_progress=1.0)),
                             ("b", ProgressUpdate(Phase.ANALYZING))]
    for doubtful in (b'{"updates":[]}', b'{"updates":[{"phase":"QUEUED"}]}',
                     b'{"updates":[{"job_id":"a\\n","phase":"QUEUED"}]}',
                     b'{"updates":[{"job_id":"a","phase":"QUEUED"}],"more":1}',
                     b'{"updates":[{"job_id":"a","phase":"QUEUED","phase_progress":200}]}',
                     b'{"updates":' + b"[" + b",".join([b'{"job_id":"a","phase":"QUEUED"}'] * 501) + b"]}"):
        assert _batch(doubtful) is None, doubtful[:60]


# --- both paths: the path taken, and hostile input against the full route ------------------


def thin_answered(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'phasecast_thin_requests_total\{transport="(\w+)"\} (\S+)', text)}


async def test_reports_are_answered_on_the_path_the_server_was_given(
    thin_server: ServerProcess, api: httpx.AsyncClient
) -> None:
    job_id = await new_job(api)
    before = thin_answered(thin_server)
    assert (await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "ANALYZING"})).status_code == 200
    batch = {"updates": [{"job_id": job_id, "phase": "GENERATING"}]}
    assert (await api.post("/v1/progress", json=batch)).status_code == 200
    after = thin_answered(thin_server)
    mine = "protocol" if thin_server.transport == "raw" else "asgi"  # type: ignore[attr-defined]
    other = "asgi" if mine == "protocol" else "protocol"
    assert after[mine] == before[mine] + 2
    assert after[other] == before[other]


# Bodies for the thin path's door (Content-Length, application/json) and the full route's
# (the same bytes chunked: the thin path never takes a chunked body). Both must answer alike.
HOSTILE_BODIES: list[bytes] = [
    b"",
    b" ",
    b"null",
    b"{}",
    b'{"phase":"GENERATING"}',
    b'{"phase":"GENERATING","phase_progress":50,"message":"m"}',
    b'{"phase":"GENERATING","phase_progress":50.5}  ',
    b'\xef\xbb\xbf{"phase":"GENERATING"}',
    '{"phase":"GENERATING"}'.encode("utf-16"),
    '{"phase":"GENERATING"}'.encode("utf-32-le"),
    b'{"phase":"GENERATING","phase":"ANALYZING"}',
    b'{"phase":"GENERATING","phase_progress":100.0000001}',
    b'{"phase":"GENERATING","phase_progress":1e2}',
    b'{"phase":"GENERATING","phase_progress":-0.0}',
    b'{"phase":"GENERATING","phase_progress":Infinity}',
    b'{"phase":"GENERATING","phase_progress":' + b"9" * 400 + b"}",
    b'{"phase":"GENERATING","steps_total":' + b"9" * 5000 + b"}",
    b'{"phase":"GENERATING","message":"' + "ü".encode() * 500 + b'"}',
    b'{"phase":"GENERATING","message":"' + "ü".encode() * 501 + b'"}',
    b'{"phase":"GENERATING","message":"a\\u0000b"}',
    b'{"phase":"GENERATING","message":"\\udfff\\ud800"}',
    b'{"phase":"GENERATING","message":"\xff"}',
    b'{"phase":"GENERATING","message":' + b"[" * 200 + b"]" * 200 + b"}",
    b'{"phase":"GENERATING","step":"' + b"s" * 200 + b'"}',
    b'{"phase":"GENERATING","step":"a","step_status":"done","steps_total":3}',
    b'{"phase":"GENERATING","step":"a","step_progress":50,"step_status":"failed"}',
    b'{"phase":"generating"}',
    b'{"phase":"COMPLETE"}',
    b'{"phase":"GENERATING","job_id":"other"}',
    b'{"phase":"GENERATING"}{"phase":"GENERATING"}',
    b'["phase","GENERATING"]',
    *DOUBTFUL_BODIES,
]


def comparable(reply: httpx.Response, job_id: str) -> tuple[int, Any]:
    """Status and body with what differs between two jobs (their id, times) taken out."""
    try:
        data = reply.json()
    except ValueError:
        return reply.status_code, reply.content
    if isinstance(data, dict) and isinstance(data.get("state"), dict):
        state = dict(data["state"])
        assert state.pop("job_id") == job_id
        for key in ("created_at", "updated_at", "eta_seconds", "phase_started_at", "epoch"):
            state.pop(key, None)
        state["phases"] = sorted(state.get("phases", {}))
        data = {**data, "state": state}
    return reply.status_code, data


async def test_hostile_reports_get_the_same_answer_as_from_the_full_route(api: httpx.AsyncClient) -> None:
    async def chunked(body: bytes) -> AsyncIterator[bytes]:
        yield body

    json_type = {"Content-Type": "application/json"}
    for body in HOSTILE_BODIES:
        thin_job, full_job = await new_job(api), await new_job(api)
        thin = await api.post(f"/v1/jobs/{thin_job}/progress", content=body, headers=json_type)
        full = await api.post(f"/v1/jobs/{full_job}/progress", content=chunked(body), headers=json_type)
        assert comparable(thin, thin_job) == comparable(full, full_job), body[:80]
        assert thin.status_code < 500, body[:80]
        if thin.status_code != 200:
            assert (await api.get(f"/v1/jobs/{thin_job}")).json()["seq"] == 1, body[:80]
        # The same inside a batch: one doubtful report and the whole batch is the route's.
        try:
            item = json.loads(body)
        except ValueError:
            continue
        if not isinstance(item, dict):
            continue
        batch = json.dumps({"updates": [{"job_id": thin_job, "phase": "ANALYZING"},
                                        {**item, "job_id": full_job}]}).encode()
        thin = await api.post("/v1/progress", content=batch, headers=json_type)
        full = await api.post("/v1/progress", content=chunked(batch), headers=json_type)
        assert thin.status_code == full.status_code, body[:80]
        if thin.status_code != 200:
            assert thin.json() == full.json(), body[:80]


async def test_a_refused_or_other_callers_report_gets_the_routes_answer(
    api: httpx.AsyncClient, make_token: Any
) -> None:
    job_id = await new_job(api)
    url = f"/v1/jobs/{job_id}/progress"
    expired = make_token("worker", ("jobs:write",), ttl=-120)
    cases: list[dict[str, str]] = [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/json", "Authorization": "Basic abc"},
        {"Content-Type": "application/json", "Authorization": "Bearer"},
        {"Content-Type": "application/json", "Authorization": f"Bearer {expired}"},
        {"Content-Type": "application/json", "Authorization": f"Bearer {make_token('bob', ('jobs:read',))}"},
        {"Content-Type": "application/json", "Authorization": f"Bearer {make_token('bob', ('admin',))}"},
        {"Content-Type": "application/json", "Origin": "https://example.com"},
        {"Content-Type": "application/json", "X-Request-ID": "x" * 65},
        {"Content-Type": "application/json", "X-Request-ID": "caller-chosen_1"},
    ]
    for headers in cases:
        reply = await api.post(url, content=b'{"phase":"GENERATING"}', headers=headers)
        assert reply.status_code in (200, 401, 403, 415), headers
        assert int(reply.headers["content-length"]) == len(reply.content)
        request_id = reply.headers["x-request-id"]
        if headers.get("X-Request-ID") == "caller-chosen_1":
            assert request_id == "caller-chosen_1"
        else:
            assert request_id and len(request_id) <= 64
        if reply.status_code == 401:
            assert reply.headers["www-authenticate"] == "Bearer"
    statuses = [(await api.post(url, content=b'{"phase":"GENERATING"}', headers=h)).status_code for h in cases[:6]]
    assert statuses == [415, 401, 401, 401, 403, 200]


# --- framing, on raw sockets ----------------------------------------------------------------


class Raw:
    """One HTTP/1.1 connection on a raw socket: write any bytes, read answers one by one."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before an answer: {self.buffer!r}")
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            if not self._fill():
                raise ConnectionError("closed within an answer")
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        self.buffer = rest[length:]
        return status, headers, rest[:length]

    def closed_by_server(self) -> bool:
        try:
            return not self.buffer and not self._fill()
        except (ConnectionResetError, TimeoutError):
            return False


def post(path: str, body: bytes, token: str, extra: str = "", request_id: str = "") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}")
    if request_id:
        head += f"X-Request-ID: {request_id}\r\n"
    return head.encode() + b"\r\n" + body


@contextlib.contextmanager
def raw_connection(server: ServerProcess) -> Iterator[Raw]:
    connection = Raw(server.port)
    try:
        yield connection
    finally:
        connection.close()


async def test_pipelined_requests_are_answered_in_order_whichever_path_each_takes(
    thin_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id = await new_job(api)
    path = f"/v1/jobs/{job_id}/progress"
    good = b'{"phase":"ANALYZING","phase_progress":%d}'
    requests = [
        (post(path, good % 10, worker_token, request_id="r1"), 200),
        (f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {worker_token}\r\n"
         "X-Request-ID: r2\r\n\r\n".encode(), 200),
        (post(path, good % 20, worker_token, request_id="r3"), 200),
        (post(path, b'{"phase":"ANALYZING","phase_progress":"30"}', worker_token, request_id="r4"), 422),
        (post(path, good % 40, worker_token, request_id="r5"), 200),
        (post("/v1/progress", b'{"updates":[{"job_id":"%s","phase":"ANALYZING","phase_progress":50}]}'
              % job_id.encode(), worker_token, request_id="r6"), 200),
        (post("/v1/jobs/thin-none/progress", good % 1, worker_token, request_id="r7"), 404),
        (post(path, good % 60, worker_token, request_id="r8"), 200),
    ]
    with raw_connection(thin_server) as raw:
        raw.send(b"".join(request for request, _ in requests))
        answers = [raw.answer() for _ in requests]
    assert [(s, h["x-request-id"]) for s, h, _ in answers] == [
        (status, f"r{k + 1}") for k, (_, status) in enumerate(requests)
    ]
    seqs = [json.loads(body)["state"]["seq"] for (s, _, body), k in zip(answers, range(8), strict=True)
            if s == 200 and k in (0, 2, 4, 7)]
    assert seqs == [2, 3, 4, 6]
    assert json.loads(answers[5][2])["results"][0]["seq"] == 5
    assert json.loads(answers[1][2])["seq"] == 2  # read after the first report, before the second
    assert (await api.get(f"/v1/jobs/{job_id}")).json()["phase_progress"] == 60.0


async def test_a_body_that_trickles_in_is_read_whole(
    thin_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id = await new_job(api)
    request = post(f"/v1/jobs/{job_id}/progress", b'{"phase":"ANALYZING","phase_progress":7}', worker_token)
    with raw_connection(thin_server) as raw:
        for k in range(0, len(request), 9):
            raw.send(request[k:k + 9])
            await asyncio.sleep(0.002)  # separate segments, not a wait for anything
        status, _, body = raw.answer()
    assert status == 200 and json.loads(body)["state"]["phase_progress"] == 7.0


async def test_framing_the_thin_path_does_not_take_is_handled_as_by_the_route(
    thin_server: ServerProcess, api: httpx.AsyncClient, worker_token: str
) -> None:
    job_id = await new_job(api)
    path = f"/v1/jobs/{job_id}/progress"
    body = b'{"phase":"ANALYZING","phase_progress":5}'
    # Expect: 100-continue: the server asks for the body, then answers.
    with raw_connection(thin_server) as raw:
        raw.send(post(path, b"", worker_token, extra="Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(body)))
        assert raw.answer()[0] == 100
        raw.send(body)
        assert raw.answer()[0] == 200
    # HTTP/1.0 and Connection: close: answered, then the server closes.
    for request in (post(path, body, worker_token).replace(b"HTTP/1.1", b"HTTP/1.0"),
                    post(path, body, worker_token, extra="Connection: close\r\n")):
        with raw_connection(thin_server) as raw:
            raw.send(request)
            assert raw.answer()[0] == 200
            assert raw.closed_by_server()
    # A body past the thin cap but within the route's: applied by the route.
    padded = b'{"phase":"ANALYZING","phase_progress":6}' + b" " * MAX_THIN_BODY
    with raw_connection(thin_server) as raw:
        raw.send(post(path, padded, worker_token))
        status, _, reply = raw.answer()
        assert status == 200 and json.loads(reply)["state"]["phase_progress"] == 6.0
    # A body past the route's cap (32 KiB): 413, then closed.
    with raw_connection(thin_server) as raw:
        raw.send(post(path, b'{"phase":"ANALYZING","phase_progress":9}' + b" " * 40_000, worker_token))
        status, headers, reply = raw.answer()
        assert status == 413 and json.loads(reply)["error"]["code"] == "too_large"
        assert headers.get("connection") == "close"
    # Two Content-Lengths, or a body cut short by the client: refused or dropped, nothing stored.
    with raw_connection(thin_server) as raw:
        raw.send(post(path, body, worker_token, extra=f"Content-Length: {len(body)}\r\n"))
        assert raw.answer()[0] == 400
    with raw_connection(thin_server) as raw:
        raw.send(post(path, body, worker_token)[:-5])
    assert (await api.get(f"/v1/jobs/{job_id}")).json()["phase_progress"] == 6.0
    # The server still answers on a fresh connection.
    assert (await api.post(path, json={"phase": "ANALYZING", "phase_progress": 8})).status_code == 200
