"""``phasecast serve --workers N`` (issue 10, section 2): N processes on one port, each with
its own hub and change feed; SQLite refuses more than one."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tests.support.clients import WSWatcher
from tests.support.process import TEST_SECRET, ServerProcess, free_port


def serving_pids(port: int) -> set[int]:
    """Pids of the processes holding established connections on ``port`` (server side)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        check=True, capture_output=True, text=True,
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def test_sqlite_refuses_more_than_one_worker(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "phasecast", "serve", "--port", str(free_port()),
         "--engine", f"sqlite:///{tmp_path / 'x.db'}", "--workers", "2"],
        capture_output=True, text=True, timeout=30,
        env={"PHASECAST_JWT_SECRET": TEST_SECRET, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert "one process owns an SQLite file" in done.stderr
    assert "redis://" in done.stderr
    assert not (tmp_path / "x.db").exists()  # refused before anything was opened


def test_workers_must_be_a_count_or_auto(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "phasecast", "serve", "--workers", "many"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert "auto" in done.stderr


@pytest.mark.redis
def test_two_workers_run_behind_redis_sentinel(sentinel_engine_url: str, tmp_path: Path) -> None:
    with ServerProcess(sentinel_engine_url, args=["--workers", "2"], log_path=tmp_path / "s.log") as server:
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert server.log().count("engine started") == 2


@pytest.mark.redis
async def test_two_workers_on_redis_both_serve_watchers(
    redis_engine_url: str, tmp_path: Path, make_token: Callable[..., str], worker_token: str
) -> None:
    with ServerProcess(redis_engine_url, args=["--workers", "2"], log_path=tmp_path / "s.log") as server:
        headers = {"Authorization": f"Bearer {worker_token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as api:
            assert (await api.post("/v1/jobs", json={"job_id": "w", "owner": "alice"})).status_code == 201
            watchers: list[WSWatcher] = []
            # The kernel hands each new connection to one of the workers; open watchers until
            # both hold some (a few dozen at most).
            while len(watchers) < 64:
                watcher = await WSWatcher(server.url, make_token("alice")).connect()
                await watcher.subscribe("w")
                await watcher.wait_seq("w", 1)
                watchers.append(watcher)
                if len(watchers) >= 8 and len(serving_pids(server.port) - {server.pid}) >= 2:
                    break
            pids = serving_pids(server.port) - {server.pid}
            assert len(pids) == 2, f"connections held by {pids}"
            for progress in (25, 50, 75):
                reply = await api.post("/v1/jobs/w/progress",
                                       json={"phase": "ANALYZING", "phase_progress": progress})
                assert reply.status_code == 200
            assert (await api.post("/v1/jobs/w/complete", json={})).status_code == 200
            for watcher in watchers:
                final = await watcher.wait_terminal("w")
                assert final.state["phase"] == "COMPLETE"
                seqs = watcher.seqs("w")
                assert seqs == sorted(set(seqs))
                await watcher.close()
    assert server.log().count("engine started") == 2
