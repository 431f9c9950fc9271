"""The poller survives: a server killed mid-generation resumes polling after a restart; with
two instances on one Redis each RunPod job is polled by exactly one of them, and the other
takes over when that one dies; the embedded SQLite engine keeps its in-flight panels too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from runpod_helpers import (
    Comic,
    assert_never_backwards,
    done_transitions,
    eventually,
    panel_inputs,
    runpod_env,
)
from tests.support.process import ServerProcess

from phasecast.simulators.runpod import RunPodSimulator

pytestmark = pytest.mark.slow

ComicFactory = Callable[[ServerProcess, str], Comic]
PANELS = [f"panel-{n}" for n in range(1, 7)]


def long_panels() -> list[dict[str, object]]:
    # About 2 s IN_PROGRESS each: long enough to kill a server in the middle.
    return panel_inputs(6, {n: {"steps": 20} for n in range(1, 7)})


async def kill_mid_generation_and_finish(
    server: ServerProcess, sim: RunPodSimulator, comic: Comic
) -> None:
    await comic.start(long_panels())
    assert comic.watcher is not None
    await comic.watcher.wait_for(lambda w: any(
        0 < s["progress"] < 100 for s in w.states["comic-crash"][-1].state["steps"].values()), 15)
    before = comic.watcher.states["comic-crash"][-1].state
    assert before["phase"] == "GENERATING"

    server.kill()  # SIGKILL: no shutdown hook runs; only what was stored survives
    await comic.watcher.wait_closed()
    polls_before_restart = sim.requests["GET /status"]
    server.start()

    # The watcher reconnects with its last seq, as a browser would.
    await comic.watch(since=before["seq"])
    generated = await comic.wait_generated(timeout=40)
    assert generated["phase"] == "POST_PROCESSING", generated
    final = await comic.finish()
    assert final["phase"] == "COMPLETE"
    assert sim.requests["GET /status"] > polls_before_restart  # polling resumed
    assert sim.deliveries == []  # webhooks were dropped: only the poller could finish
    states = comic.states()
    assert states[0]["seq"] > before["seq"]
    assert_never_backwards(states)
    assert len(sim.jobs) == 6  # nothing was submitted twice


async def test_server_killed_mid_generation_resumes_polling(
    engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    sim.faults.drop_webhook = True
    server = ServerProcess(engine_url, env=runpod_env(sim), log_path=tmp_path / "server.log")
    server.start()
    comic = comic_factory(server, "comic-crash")
    try:
        await kill_mid_generation_and_finish(server, sim, comic)
    finally:
        await comic.close()
        server.stop()


@pytest.mark.redis
async def test_two_instances_poll_each_runpod_job_once_and_take_over_from_a_dead_one(
    redis_engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    sim.faults.drop_webhook = True
    env = runpod_env(sim)
    with (
        ServerProcess(redis_engine_url, env=env, log_path=tmp_path / "a.log") as instance_a,
        ServerProcess(redis_engine_url, env=env, log_path=tmp_path / "b.log") as instance_b,
    ):
        # Submitted through A (whose poller then holds the leases), watched and finished on B.
        submit = comic_factory(instance_a, "comic-shared")
        comic = comic_factory(instance_b, "comic-shared")
        try:
            await submit.start(long_panels())
            await comic.start_watching_only()
            await eventually(lambda: len(sim.jobs) == 6 and all(sim.pollers.get(job) for job in sim.jobs),
                             15, "every RunPod job polled")
            assert comic.watcher is not None
            await comic.watcher.wait_for(lambda w: sum(
                0 < s["progress"] < 100 for s in w.states["comic-shared"][-1].state["steps"].values()) >= 3, 15)
            # While both live, each RunPod job is polled by one instance only: A, which holds
            # the leases and renews them with every poll.
            snapshot = {job: set(agents) for job, agents in sim.pollers.items()}
            assert all(len(agents) == 1 for agents in snapshot.values()), snapshot
            (agent_a,) = set().union(*snapshot.values())
            unfinished = [job.id for job in sim.jobs.values() if job.status == "IN_PROGRESS"]
            assert unfinished

            instance_a.kill()  # its leases expire (1.5 s) and B takes the jobs over
            generated = await comic.wait_generated(timeout=40)
            assert generated["phase"] == "POST_PROCESSING", generated
            final = await comic.finish()
            assert final["phase"] == "COMPLETE"
            assert done_transitions(comic.states()) == dict.fromkeys(PANELS, 1)
            assert_never_backwards(comic.states())
            assert all(job.status == "COMPLETED" for job in sim.jobs.values())
            for job in unfinished:
                assert len(sim.pollers[job]) == 2 and agent_a in sim.pollers[job], sim.pollers[job]
        finally:
            await comic.close()
            await submit.close()
