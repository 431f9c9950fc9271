"""The thin path for single reports (``server/ingest.py``) answers exactly what the full route
would, and leaves everything it does not plainly accept to the full route."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from tests.support.process import ServerProcess

from phasecast.model import Phase, ProgressUpdate
from phasecast.server.ingest import MAX_THIN_BODY, _batch, _update


@pytest.fixture
async def api(module_server: ServerProcess, worker_token: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=module_server.url, headers=headers) as client:
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


@pytest.mark.parametrize(
    "body",
    [
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
    ],
)
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
