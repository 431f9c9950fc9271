"""``phasecast serve --workers N`` (issue 10, section 2): N processes on one port, each with
its own hub and change feed; SQLite refuses more than one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
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


def worker_pids(supervisor: int) -> set[int]:
    """The uvicorn worker processes below ``supervisor`` (multiprocessing spawns them)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor and b"spawn_main" in cmdline:
            found.add(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie no longer does: an orphan's exit is reaped by
    whatever adopted it, if ever)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.redis
def test_workers_stop_when_their_supervisor_is_killed(redis_engine_url: str, tmp_path: Path) -> None:
    """SIGKILL of ``serve --workers 2`` (no shutdown hook runs in the supervisor): its
    workers notice and stop, instead of serving on under nobody."""
    server = ServerProcess(redis_engine_url, args=["--workers", "2"], log_path=tmp_path / "s.log")
    server.start()
    workers: set[int] = set()
    try:
        workers = worker_pids(server.pid)
        assert len(workers) == 2
        server.kill()
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [pid for pid in workers if running(pid)]
        assert alive == [], f"workers still running after their supervisor died: {alive}"
        assert server.log().count("the supervisor (pid") == 2
    finally:
        for pid in workers:  # none expected to be left; never leave one serving
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        server.stop()
