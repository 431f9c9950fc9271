"""The ``phasecast`` command as a user runs it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.support.process import TEST_SECRET, ServerProcess

from phasecast.config import Settings
from phasecast.server.auth import TokenVerifier


def phasecast(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phasecast", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60,
    )


def test_token_signs_with_the_configured_secret(tmp_path: Path) -> None:
    result = phasecast("token", "--sub", "alice", "--scope", "jobs:read", cwd=tmp_path,
                       env={"PHASECAST_JWT_SECRET": TEST_SECRET})
    assert result.returncode == 0, result.stderr
    principal = TokenVerifier(Settings(jwt_secret=TEST_SECRET)).verify(result.stdout.strip())
    assert principal.sub == "alice"
    assert principal.scopes == {"jobs:read"}


def test_token_without_a_secret_uses_the_development_secret_it_keeps(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if k != "PHASECAST_JWT_SECRET"}
    first = subprocess.run([sys.executable, "-m", "phasecast", "token", "--sub", "a"], cwd=tmp_path,
                           env=clean, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    secret = (tmp_path / ".phasecast" / "dev-secret").read_text()
    assert oct((tmp_path / ".phasecast" / "dev-secret").stat().st_mode & 0o777) == "0o600"
    assert TokenVerifier(Settings(jwt_secret=secret)).verify(first.stdout.strip()).sub == "a"


def test_bad_configuration_is_explained(tmp_path: Path) -> None:
    result = phasecast("token", "--sub", "a", "--scope", "root", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown scope 'root'" in result.stderr
    short = phasecast("token", "--sub", "a", cwd=tmp_path, env={"PHASECAST_JWT_SECRET": "short"})
    assert short.returncode == 2
    assert "at least 32 bytes" in short.stderr
    engine = phasecast("serve", "--engine", "mongodb://x", cwd=tmp_path, env={"PHASECAST_JWT_SECRET": TEST_SECRET})
    assert engine.returncode == 2
    assert "unknown engine URL" in engine.stderr


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_watch_follows_a_job_to_the_end(
    transport: str, sqlite_engine_url: str, tmp_path: Path, worker_token: str
) -> None:
    with ServerProcess(sqlite_engine_url, log_path=tmp_path / "server.log") as server:
        headers = {"Authorization": f"Bearer {worker_token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as api:
            await api.post("/v1/jobs", json={"job_id": "watched", "owner": "alice"})
            watch = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "phasecast", "watch", "watched", "--url", server.url,
                "--token", worker_token, "--transport", transport,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "COLUMNS": "120"},
            )
            await api.post("/v1/jobs/watched/progress", json={"phase": "GENERATING", "phase_progress": 50})
            await api.post("/v1/jobs/watched/complete", json={})
            _, stderr = await asyncio.wait_for(watch.communicate(), 30)
    assert watch.returncode == 0, stderr.decode()
    assert "COMPLETE" in stderr.decode()


async def test_json_logs_carry_request_and_job_ids_and_never_tokens(
    sqlite_engine_url: str, tmp_path: Path, worker_token: str
) -> None:
    import json

    with ServerProcess(sqlite_engine_url, env={"PHASECAST_LOG_JSON": "true"}, log_path=tmp_path / "s.log") as server:
        headers = {"Authorization": f"Bearer {worker_token}", "X-Request-ID": "req-42"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as api:
            await api.post("/v1/jobs", json={"job_id": "logged", "owner": "alice"})
            refused = await api.post("/v1/jobs/logged/progress", json={"phase": "ANALYZING", "phase_progress": 500})
            assert refused.status_code == 422
            await api.post("/v1/jobs/logged/complete", json={})
            # A token in the query string (as EventSource must send it) stays out of the log.
            streamed = await api.get(f"/v1/jobs/logged/events?access_token={worker_token}", headers={"Authorization": ""})
            assert streamed.status_code == 200
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "req-42"]
    assert any(line["logger"] == "phasecast.access" and line.get("job_id") == "logged" for line in mine)
    rejected = [line for line in mine if line["message"].startswith("request rejected")]
    assert rejected
    assert rejected[0]["job_id"] == "logged"
    assert "phase_progress" in rejected[0]["message"]
    assert all(worker_token not in json.dumps(line) for line in lines)
