"""The OpenAPI document is the contract: schemathesis fuzzes every operation of the served
document against a real server process, with every check on, once with a write token (on
SQLite) and once with a read token (on Redis): both tokens and both engines, in about two
minutes on a 2-core machine.

Every check means: no 5xx; every status, content type, header and body as documented; every
request the schema allows accepted (or refused only for a documented reason: 401/403/404/409);
every request it forbids refused; 405 with a correct ``Allow``; auth not ignored.

The SSE operations (tag ``streams``) are fuzzed too: their resume points carry patterns, their
``text/event-stream`` responses a schema per event, which schemathesis checks event by event.
A stream may run for as long as its token lasts, so the fuzz reads an event stream for
``STREAM_SECONDS`` at most (schemathesis keeps what arrived and checks it); every other
request keeps the 10 s timeout. One mismatch is configured, not ignored: ``GET /v1/events``
needs ``job`` or ``follow`` (one of the two), which a list of query parameters cannot state,
so that operation's positive-data check also expects the 422 that says so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tests.support.process import ServerProcess

# Cases per operation: enough to cover each schema's keywords (schemathesis's coverage phase
# adds its boundary and negative cases on top), small enough for a 2-core machine.
MAX_EXAMPLES = 8
STREAM_SECONDS = 1.5

# Per-operation settings (schemathesis.toml in the run's directory).
CONFIG = f"""
[[operations]]
include-tag = "streams"
request-timeout = {STREAM_SECONDS}

[[operations]]
include-path = "/v1/events"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx", "422"]
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("role", "engine"), [("write", "sqlite"), pytest.param("read", "redis", marks=pytest.mark.redis)])
def test_every_operation_holds_to_the_openapi_document(
    request: pytest.FixtureRequest, make_token: Callable[..., str], role: str, engine: str, tmp_path: Path
) -> None:
    server = ServerProcess(request.getfixturevalue(f"{engine}_engine_url"), log_path=tmp_path / "server.log")
    with server:
        if role == "read":
            seed_jobs_to_stream(server, make_token("worker", ("jobs:write",)))
        run_schemathesis(server, make_token, role, tmp_path)
        if role == "read":
            assert_streams_were_read(tmp_path / "fuzz.har")


def seed_jobs_to_stream(server: ServerProcess, worker_token: str) -> None:
    """The read token's user gets an active job and an ended one, so its ``follow=active``
    streams carry state events (checked against the event schema), not only heartbeats."""
    headers = {"Authorization": f"Bearer {worker_token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as api:
        for job_id in ("fuzz-active", "fuzz-ended"):
            reply = api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})
            assert reply.status_code == 201, reply.text
            reply = api.post(f"/v1/jobs/{job_id}/progress", json={"phase": "ANALYZING", "phase_progress": 0.5})
            assert reply.status_code == 200, reply.text
        assert api.post("/v1/jobs/fuzz-ended/complete", json={}).status_code == 200


def assert_streams_were_read(har: Path) -> None:
    """The fuzz really read event streams: some ``GET /v1/events`` answered 200 with state
    events (which schemathesis validated one by one against the documented event schema)."""
    entries = json.loads(har.read_text())["log"]["entries"]
    streamed = [
        entry for entry in entries
        if entry["request"]["url"].split("?")[0].endswith("/v1/events")
        and entry["response"]["status"] == 200
        and entry["response"]["content"].get("mimeType", "").startswith("text/event-stream")
    ]
    assert streamed, "no event stream was read"
    assert any("event: state" in entry["response"]["content"].get("text", "") for entry in streamed)


def run_schemathesis(server: ServerProcess, make_token: Callable[..., str], role: str, tmp_path: Path) -> None:
    token = make_token("worker", ("jobs:write",)) if role == "write" else make_token("alice", ("jobs:read",))
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--header", f"Authorization: Bearer {token}",
        "--request-timeout", "10",
        "--workers", "1",
        "--suppress-health-check", "all",
        "--report", "har", "--report-har-path", str(tmp_path / "fuzz.har"),
    ]
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    started = time.monotonic()
    run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=280, check=False)
    output = run.stdout + run.stderr
    summary = [line for line in output.splitlines() if "generated" in line or "passed" in line]
    print(f"\nschemathesis ({role} token, {server.engine.split(':')[0]}) in "
          f"{time.monotonic() - started:.0f} s: {summary[-1].strip() if summary else '?'}")
    assert run.returncode == 0, output[-8000:]
    tested = re.search(r"Tested: (\d+)", output)
    assert tested is not None and int(tested.group(1)) >= 14, output[-2000:]  # every operation, streams too


def test_the_document_states_the_error_body_id_pattern_and_working_phases() -> None:
    from tests.support.process import TEST_SECRET

    from phasecast.config import Settings
    from phasecast.model import JOB_ID_PATTERN, WORKING_PHASES
    from phasecast.server.app import create_app

    document = create_app(Settings(jwt_secret=TEST_SECRET)).openapi()
    text = str(document)
    assert "HTTPValidationError" not in text and "'detail'" not in text
    schemas = document["components"]["schemas"]
    assert set(schemas["ErrorBody"]["required"]) == {"error"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path.startswith("/v1/"):
                    body = response["content"]["application/json"]["schema"]
                    if "$ref" in body:
                        body = schemas[body["$ref"].rsplit("/", 1)[1]]
                    error = body["properties"]["error"]
                    if "$ref" in error:
                        error = schemas[error["$ref"].rsplit("/", 1)[1]]
                    assert {"code", "message"} <= set(error["required"]), (method, path, status)
            if path.startswith("/v1/") and "{job_id}" in path:
                (job_id,) = [p for p in operation["parameters"] if p["name"] == "job_id"]
                assert job_id["schema"]["pattern"] == JOB_ID_PATTERN.pattern, (method, path)
            if operation.get("security"):
                assert "401" in operation["responses"], (method, path)
            assert "413" in operation["responses"], (method, path)
    report = schemas["ProgressReport"]
    assert report["properties"]["phase"]["enum"] == [p.value for p in WORKING_PHASES]
    assert report["dependentRequired"] == {"step_progress": ["step"], "step_status": ["step"]}
    assert schemas["BatchItem"]["properties"]["job_id"]["pattern"] == JOB_ID_PATTERN.pattern
    assert schemas["CreateJob"]["properties"]["job_id"]["pattern"] == JOB_ID_PATTERN.pattern
    for name in ("phase_progress", "step_progress"):
        assert report["properties"][name]["type"] == "number"  # not nullable, not a string
    progress = document["paths"]["/v1/jobs/{job_id}/progress"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "409", "413", "415", "422", "503"} <= set(progress)
