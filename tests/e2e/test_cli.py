"""The ``phasecast`` command as a user runs it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.support.process import TEST_SECRET, ServerProcess, free_port

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


# --- the first hour: expected failures, help, the watch display -------------------------------


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_expected_failures_print_one_clear_line_and_exit_non_zero(tmp_path: Path) -> None:
    env = {"PHASECAST_JWT_SECRET": TEST_SECRET}
    nothing_there = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["serve", "--engine", "redis://127.0.0.1:1/0", "--port", str(free_port())], "unreachable", 1),
        (["watch", "some-job", "--url", nothing_there], "cannot reach", 1),
        (["watch", "some-job", "--url", "127.0.0.1:8000"], "--url must start with http", 2),
        (["watch", "some-job", "--transport", "carrier-pigeon"], "--transport must be", 2),
    ]
    for args, says, code in cases:
        result = phasecast(*args, cwd=tmp_path, env=env)
        assert result.returncode == code, (args, result.stderr)
        lines = stderr_lines(result)
        assert len(lines) == 1, (args, result.stderr)
        assert says in lines[0]
        assert "Traceback" not in result.stderr
    with socket.socket() as taken:  # a second server on a port that is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for command in ("serve", "demo"):
            result = phasecast(command, "--port", port, cwd=tmp_path, env=env)
            assert result.returncode == 1, result.stderr
            assert stderr_lines(result) == [f"error: 127.0.0.1:{port} is in use (another Phasecast running?); pass another --port or stop what listens there"]
    debug = phasecast("--debug", "watch", "some-job", "--url", nothing_there, cwd=tmp_path, env=env)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr
    assert "ConnectionFailedError" in debug.stderr


def test_help_names_the_environment_variables_and_every_option(tmp_path: Path) -> None:
    wide = {"COLUMNS": "250", "TERM": "dumb"}
    serve = phasecast("serve", "--help", cwd=tmp_path, env=wide)
    assert serve.returncode == 0
    for name in ("PHASECAST_HOST", "PHASECAST_PORT", "PHASECAST_ENGINE", "PHASECAST_ARCHIVE", "PHASECAST_LOG_LEVEL"):
        assert name in serve.stdout, name
    demo = phasecast("demo", "--help", cwd=tmp_path, env=wide)
    failure_rate = next(line for line in demo.stdout.splitlines() if "--failure-rate" in line)
    assert "Share of simulated generations that fail" in failure_rate
    watch = phasecast("watch", "--help", cwd=tmp_path, env=wide)
    assert "PHASECAST_TOKEN" in watch.stdout


@pytest.mark.parametrize(("ending", "exit_code", "says"), [
    ("complete", 0, None),
    ("fail", 1, "failed: CUDA out of memory"),
    ("cancel", 1, "cancelled: "),
])
async def test_watch_ends_with_the_job_and_shows_no_time_left_once_it_ended(
    ending: str, exit_code: int, says: str | None, sqlite_engine_url: str, tmp_path: Path, worker_token: str
) -> None:
    bodies = {
        "complete": {},
        "fail": {"error": {"code": "gpu_oom", "message": "CUDA out of memory"}},
        "cancel": {"reason": "Cancelled by the user"},
    }
    with ServerProcess(sqlite_engine_url, log_path=tmp_path / "server.log") as server:
        headers = {"Authorization": f"Bearer {worker_token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as api:
            await api.post("/v1/jobs", json={"job_id": "ending", "owner": "alice"})
            await api.post("/v1/jobs/ending/progress", json={"phase": "GENERATING", "phase_progress": 50})
            await api.post(f"/v1/jobs/ending/{ending}", json=bodies[ending])
        # No --token: the CLI mints its own with the configured secret.
        result = await asyncio.to_thread(
            phasecast, "watch", "ending", "--url", server.url, cwd=tmp_path,
            env={"PHASECAST_JWT_SECRET": TEST_SECRET, "COLUMNS": "160"},
        )
    assert result.returncode == exit_code, result.stderr
    assert "s left" not in result.stderr  # the server's eta is 0 at the end: not shown
    assert {"complete": "COMPLETE", "fail": "FAILED", "cancel": "CANCELLED"}[ending] in result.stderr
    if says:
        assert says in result.stderr


def test_watching_a_job_that_does_not_exist_says_so(sqlite_engine_url: str, tmp_path: Path, worker_token: str) -> None:
    with ServerProcess(sqlite_engine_url, log_path=tmp_path / "server.log") as server:
        result = phasecast("watch", "no-such-job", "--url", server.url, "--token", worker_token, cwd=tmp_path)
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert "no-such-job" in lines[0]
