"""Redis restarted mid-job (same append-only file) under watchers on two server instances
(issue 8, section 7): every change accepted around the restart reaches every watcher without
a reconnect, ``/readyz`` says not ready until the change feed is back, and every watcher ends
with the terminal state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tests.support.clients import WSWatcher
from tests.support.process import ServerProcess
from tests.support.redis_servers import RedisNode

pytestmark = [pytest.mark.redis, pytest.mark.slow]

JOBS = ["r-1", "r-2", "r-3", "gap"]  # "gap" ends with one report sent right at the restart


async def post_until_accepted(
    api: httpx.AsyncClient, path: str, body: dict[str, object], accepted: list[float]
) -> httpx.Response:
    """Retry a report through 503s (Redis is down); record when it was accepted."""
    deadline = time.monotonic() + 30
    while True:
        try:
            reply = await api.post(path, json=body)
        except httpx.TransportError:
            reply = None
        if reply is not None and reply.status_code != 503:
            assert reply.status_code in (200, 201), reply.text
            accepted.append(time.monotonic())
            return reply
        assert time.monotonic() < deadline, "writes never resumed after the restart"
        await asyncio.sleep(0.01)


async def wait_ready(api: httpx.AsyncClient, timeout: float) -> float:
    """Monotonic time at which ``/readyz`` first answered 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_feed = await api.get("/readyz")
        if with_feed.status_code == 200:
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise TimeoutError("never ready again")


async def test_redis_restart_mid_job_loses_nothing_for_watchers_on_two_instances(
    tmp_path: Path, make_token: Callable[..., str], worker_token: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with RedisNode(aof=True) as redis_node:
        env = {"PHASECAST_PING_INTERVAL": "1"}
        with (
            ServerProcess(redis_node.url, env=env, log_path=tmp_path / "a.log") as first,
            ServerProcess(redis_node.url, env=env, log_path=tmp_path / "b.log") as second,
            ServerProcess(redis_node.url, env=env, log_path=tmp_path / "w.log") as writer,
        ):
            # Watchers on two instances; the workers report through a third one, so the
            # watchers' instances see Redis again only through their own links.
            headers = {"Authorization": f"Bearer {worker_token}"}
            async with (
                httpx.AsyncClient(base_url=first.url, headers=headers, timeout=5) as api_a,
                httpx.AsyncClient(base_url=second.url, headers=headers, timeout=5) as api_b,
                httpx.AsyncClient(base_url=writer.url, headers=headers, timeout=5) as api_w,
            ):
                for job_id in JOBS:
                    created = await api_w.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})
                    assert created.status_code == 201
                watchers = [
                    await WSWatcher(server.url, make_token("alice")).connect()
                    for server in (first, second, first, second)
                ]
                for watcher in watchers:
                    for job_id in JOBS:
                        await watcher.subscribe(job_id)
                for watcher in watchers:
                    for job_id in JOBS:
                        await watcher.wait_seq(job_id, 1)

                accepted: list[float] = []
                restarted_at: list[float] = []  # Unix time
                ready_after: list[float] = []  # seconds from the restart to ready

                async def write(job_id: str, api: httpx.AsyncClient) -> None:
                    # Reports keep coming through the restart.
                    for progress in range(2, 100, 2):
                        await post_until_accepted(
                            api, f"/v1/jobs/{job_id}/progress",
                            {"phase": "ANALYZING", "phase_progress": progress}, accepted,
                        )
                        count()
                        await asyncio.sleep(0.01)
                    await post_until_accepted(api, f"/v1/jobs/{job_id}/complete", {}, accepted)

                enough = asyncio.Event()
                is_down = asyncio.Event()

                def count() -> None:
                    if len(accepted) >= 40:
                        enough.set()

                async def write_gap() -> None:
                    # Its last change is accepted as soon as Redis takes writes again, when the
                    # servers' subscriber links are (probably) not back yet; nothing follows it.
                    await post_until_accepted(api_w, "/v1/jobs/gap/progress",
                                              {"phase": "ANALYZING", "phase_progress": 50}, accepted)
                    await is_down.wait()
                    await post_until_accepted(api_w, "/v1/jobs/gap/complete", {}, accepted)

                async def restart() -> None:
                    await enough.wait()
                    redis_node.kill()
                    is_down.set()
                    # Down for a moment: writes answer 503 and readiness says so.
                    down = await api_b.get("/readyz")
                    assert down.status_code == 503
                    await asyncio.sleep(1.0)  # long enough for the links to back off
                    redis_node.start()  # same port, same append-only file
                    restarted_at.append(time.time())
                    started = time.monotonic()
                    ready_after.append(await wait_ready(api_b, 10) - started)

                before = {id(w): {j: w.last_seq(j) for j in JOBS} for w in watchers}
                await asyncio.gather(
                    restart(),
                    write_gap(),
                    *(write(job_id, api_w) for job_id in JOBS[:-1]),
                )
                finals = {j: (await api_a.get(f"/v1/jobs/{j}")).json() for j in JOBS}
                for watcher in watchers:
                    for job_id in JOBS:
                        last = await watcher.wait_terminal(job_id, timeout=20)
                        assert last.state == finals[job_id]
                        seqs = watcher.seqs(job_id)
                        assert seqs == sorted(set(seqs)), "a watcher saw a state twice or out of order"
                        progress = [r.state["progress"] for r in watcher.states[job_id]]
                        assert progress == sorted(progress), "progress went backwards for a viewer"
                assert finals[JOBS[0]]["phase"] == "COMPLETE"

                # The first change delivered after the restart, to any watcher.
                restart = restarted_at[0]
                first_after = min(
                    r.received_at
                    for w in watchers for j in JOBS for r in w.states[j]
                    if r.state["seq"] > before[id(w)][j] and r.received_at >= restart
                )
                with capsys.disabled():
                    print(
                        f"\nRedis restart: first change delivered {(first_after - restart) * 1000:.0f} ms "
                        f"after the restart; ready again after {ready_after[0] * 1000:.0f} ms; "
                        f"{len(accepted)} reports accepted"
                    )
                for watcher in watchers:
                    await watcher.close()
            assert "pub/sub connection lost" in first.log() + second.log()


async def test_readyz_waits_for_the_change_feed_not_only_for_redis(
    tmp_path: Path, worker_token: str
) -> None:
    """Redis answers (writes work) but the server's subscriber cannot subscribe: not ready,
    with the reason; ready again once the feed is back."""
    import redis.asyncio as aioredis

    with RedisNode(aof=False) as redis_node, ServerProcess(redis_node.url, log_path=tmp_path / "s.log") as server:
        admin = aioredis.Redis.from_url(redis_node.url)
        headers = {"Authorization": f"Bearer {worker_token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as api:
            try:
                assert (await api.get("/readyz")).status_code == 200
                await admin.execute_command("ACL", "SETUSER", "default", "-subscribe", "-ssubscribe")
                await admin.client_kill_filter(_type="pubsub")
                deadline = time.monotonic() + 10
                while (reply := await api.get("/readyz")).status_code == 200:
                    assert time.monotonic() < deadline, "still ready with no change feed"
                    await asyncio.sleep(0.01)
                assert reply.status_code == 503
                assert "change feed" in reply.json()["reason"]
                # Redis itself is fine: writes are accepted meanwhile.
                created = await api.post("/v1/jobs", json={"job_id": "while-deaf", "owner": "alice"})
                assert created.status_code == 201
                assert (await api.get("/readyz")).status_code == 503
                await admin.execute_command("ACL", "SETUSER", "default", "+subscribe", "+ssubscribe")
                ready_at = await wait_ready(api, 10)
                assert ready_at > 0
            finally:
                await admin.aclose()
