"""Crashes and scale-out: SIGKILL mid-job on each engine; two instances sharing a Redis;
the pub/sub link to Redis dropping under a live watcher."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from tests.support.clients import WSWatcher
from tests.support.process import PrivateRedis, ServerProcess

from phasecast.engines import open_engine
from phasecast.model import Phase
from phasecast.tracker import ProgressTracker


async def test_a_killed_server_restarts_with_every_job_and_watchers_resume(
    server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    worker = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=worker) as api:
        await api.post("/v1/jobs", json={"job_id": "comic-1", "owner": "alice"})
        await api.post("/v1/jobs/comic-1/progress", json={"phase": "ANALYZING", "phase_progress": 100})
        for panel in (1, 2):
            await api.post(
                "/v1/jobs/comic-1/progress",
                json={"phase": "GENERATING", "step": f"panel-{panel}", "step_progress": 100, "steps_total": 4},
            )
        watcher = await WSWatcher(server.url, make_token("alice")).connect()
        await watcher.subscribe("comic-1")
        before = await watcher.wait_seq("comic-1", 4)
        assert before.state["phase_progress"] == 50.0

        server.kill()  # SIGKILL: no graceful shutdown, as in a crash
        await watcher.wait_closed()
        server.start()

        # The generation backend carries on as soon as the server is back...
        reply = await api.post(
            "/v1/jobs/comic-1/progress",
            json={"phase": "GENERATING", "step": "panel-3", "step_progress": 100},
        )
        assert reply.status_code == 200 and reply.json()["state"]["seq"] == 5
        # ...and the viewer reconnects with its last seq and gets the current state.
        resumed = await WSWatcher(server.url, make_token("alice")).connect()
        await resumed.subscribe("comic-1", since=before.state["seq"])
        current = await resumed.wait_seq("comic-1", 5)
        assert current.state["phase_progress"] == 75.0
        assert current.state["steps"]["panel-1"]["status"] == "done"
        assert resumed.seqs("comic-1") == [5]  # nothing it already had is sent again

        await api.post("/v1/jobs/comic-1/progress", json={"phase": "GENERATING", "step": "panel-4", "step_progress": 100})
        await api.post("/v1/jobs/comic-1/progress", json={"phase": "POST_PROCESSING", "phase_progress": 100})
        await api.post("/v1/jobs/comic-1/complete", json={})
        final = await resumed.wait_terminal("comic-1")
        assert final.state["phase"] == "COMPLETE" and final.state["progress"] == 100.0
        seen = [r.state["progress"] for r in [*watcher.states["comic-1"], *resumed.states["comic-1"]]]
        assert seen == sorted(seen)
        await resumed.close()


@pytest.mark.redis
async def test_a_watcher_on_one_instance_sees_writes_through_another(
    redis_engine_url: str, tmp_path: Path, make_token: Callable[..., str], worker_token: str
) -> None:
    with (
        ServerProcess(redis_engine_url, log_path=tmp_path / "a.log") as instance_a,
        ServerProcess(redis_engine_url, log_path=tmp_path / "b.log") as instance_b,
    ):
        worker = {"Authorization": f"Bearer {worker_token}"}
        async with httpx.AsyncClient(base_url=instance_a.url, headers=worker) as api_a:
            await api_a.post("/v1/jobs", json={"job_id": "shared", "owner": "alice"})
            watcher = await WSWatcher(instance_b.url, make_token("alice")).connect()
            await watcher.subscribe("shared")
            await watcher.wait_seq("shared", 1)
            for progress in (10, 40, 90):
                await api_a.post("/v1/jobs/shared/progress", json={"phase": "ANALYZING", "phase_progress": progress})
            await api_a.post("/v1/jobs/shared/complete", json={})
            final = await watcher.wait_terminal("shared")
            assert watcher.seqs("shared") == [1, 2, 3, 4, 5]
            assert final.state["phase"] == "COMPLETE"
            await watcher.close()


@pytest.mark.redis
async def test_pubsub_link_drop_resyncs_watched_jobs(
    tmp_path: Path, make_token: Callable[..., str]
) -> None:
    """Redis kills the server's pub/sub connection while a change happens: the server
    reconnects and the watcher still gets the newest state."""
    with PrivateRedis() as private:
        with ServerProcess(private.url, env={"PHASECAST_PING_INTERVAL": "1"}, log_path=tmp_path / "s.log") as server:
            async with ProgressTracker(open_engine(private.url)) as writer:
                await writer.create(owner="alice", job_id="j1")
                watcher = await WSWatcher(server.url, make_token("alice")).connect()
                await watcher.subscribe("j1")
                await watcher.wait_seq("j1", 1)

                admin = aioredis.Redis.from_url(private.url)
                await admin.client_kill_filter(_type="pubsub")
                # Written while the server's subscriber is (probably) gone: only the resync
                # after reconnecting can deliver it.
                await writer.report("j1", Phase.ANALYZING, 50)
                await watcher.wait_seq("j1", 2, timeout=15)
                await writer.report("j1", Phase.ANALYZING, 80)
                await watcher.wait_seq("j1", 3, timeout=15)
                assert watcher.seqs("j1") == [1, 2, 3]
                await admin.aclose()
                await watcher.close()
        assert "pub/sub connection lost" in server.log()


async def wait_ready(api: httpx.AsyncClient, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if (await api.get("/readyz")).status_code == 200:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.redis
async def test_redis_outage_is_a_503_and_the_server_recovers(tmp_path: Path, worker_token: str) -> None:
    first = PrivateRedis().start()
    second = PrivateRedis(port=first.port)
    try:
        with ServerProcess(first.url, log_path=tmp_path / "s.log") as server:
            headers = {"Authorization": f"Bearer {worker_token}"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers) as api:
                assert (await api.post("/v1/jobs", json={"job_id": "j", "owner": "alice"})).status_code == 201
                first.kill()
                ready = await api.get("/readyz")
                assert ready.status_code == 503
                assert "unreachable" in ready.json()["reason"]
                down = await api.post("/v1/jobs/j/progress", json={"phase": "ANALYZING", "phase_progress": 5})
                assert down.status_code == 503
                assert down.json()["error"]["code"] == "unavailable"

                second.start()  # a new, empty Redis on the same port (this one keeps nothing on disk)
                # Ready again once the change feed is back too (not merely Redis answering).
                assert await wait_ready(api, timeout=10)
                # The state lived in the lost Redis: without an archive it is gone (docs/archive.md).
                assert (await api.get("/v1/jobs/j")).status_code == 404
                assert (await api.post("/v1/jobs", json={"job_id": "k", "owner": "alice"})).status_code == 201
        # The engine error is logged with its reason.
        assert re.search(r"request rejected: cannot (read|update) job 'j' .*Connection refused", server.log())
    finally:
        first.stop()
        second.stop()
