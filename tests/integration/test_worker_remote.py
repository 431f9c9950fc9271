"""The worker SDK over HTTP with a worker token, against a real server, watched over a
WebSocket: the complete example of docs/worker.md."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.support.clients import WSWatcher
from tests.support.process import ServerProcess

from phasecast.errors import InvalidUpdate
from phasecast.worker import WorkerError, remote_worker


async def test_a_remote_worker_drives_a_comic_that_a_viewer_watches(
    server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    async with remote_worker(server.url, worker_token) as worker:
        created = await worker.create("comic", owner="alice", metadata={"title": "Cat Detective"})
        viewer = await WSWatcher(server.url, make_token("alice")).connect()
        await viewer.subscribe(created.job_id)
        await viewer.wait_seq(created.job_id, 1)
        async with worker.job(created.job_id) as job:
            async with job.phase("ANALYZING") as phase:
                await phase.update(40, "Reading the story")
            async with job.phase("GENERATING", steps_total=3) as phase:
                for panel in (1, 2, 3):
                    await phase.step(f"panel-{panel}", 50)
                    await phase.step(f"panel-{panel}", 100)
            async with job.phase("POST_PROCESSING") as phase:
                await phase.update(60, "Lettering")
        final = await viewer.wait_terminal(created.job_id)
        await viewer.close()
    assert final.state["phase"] == "COMPLETE"
    assert list(final.state["phases"]) == ["QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]
    phases = [r.state["phase"] for r in viewer.states[created.job_id]]
    assert phases[0] == "QUEUED" and phases[-1] == "COMPLETE"
    progress = [r.state["progress"] for r in viewer.states[created.job_id]]
    assert progress == sorted(progress)


async def test_a_remote_worker_failure_is_visible_to_the_watcher(
    server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    async with remote_worker(server.url, worker_token) as worker:
        created = await worker.create(owner="alice")
        viewer = await WSWatcher(server.url, make_token("alice")).connect()
        await viewer.subscribe(created.job_id)

        async def analyse() -> None:
            async with worker.job(created.job_id) as job, job.phase("ANALYZING") as phase:
                await phase.update(10)
                raise RuntimeError("the story is empty")

        with pytest.raises(RuntimeError):
            await analyse()
        final = await viewer.wait_terminal(created.job_id)
        await viewer.close()
    assert final.state["phase"] == "FAILED"
    assert final.state["error"] == {"code": "RuntimeError", "message": "the story is empty"}


async def test_remote_refusals_raise_with_the_servers_reason(
    server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    async with remote_worker(server.url, worker_token) as worker:
        created = await worker.create(owner="alice")
        async with worker.job(created.job_id, complete_on_exit=False) as job, job.phase("ANALYZING") as phase:
            with pytest.raises(InvalidUpdate, match="phase_progress"):
                await phase.update(101)
    async with remote_worker(server.url, make_token("alice", ("jobs:read",))) as reader:
        with pytest.raises(WorkerError, match="403"):
            await reader.create(owner="alice")
