"""The worker SDK in-process, on a real tracker over the embedded SQLite engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from phasecast.engines import open_engine
from phasecast.errors import InvalidUpdate, JobTerminal
from phasecast.tracker import ProgressTracker
from phasecast.worker import Worker, local_worker


class GPUError(Exception):
    pass


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    async with ProgressTracker(open_engine(f"sqlite:///{tmp_path / 'w.db'}")) as tracker:
        yield local_worker(tracker)


async def test_phases_advance_and_the_job_completes(worker: Worker) -> None:
    job_id = (await worker.create(owner="alice", job_id="w-1")).job_id
    async with worker.job(job_id) as job:
        async with job.phase("ANALYZING") as phase:
            state = await phase.update(40, "Reading the story")
            assert (state.phase.value, state.phase_progress, state.message) == ("ANALYZING", 40, "Reading the story")
        assert job.state is not None and job.state.phase_progress == 100  # leaving finished it
        async with job.phase("GENERATING", steps_total=4) as phase:
            for panel in range(1, 5):
                await phase.step(f"panel-{panel}", 100)
            assert job.state.phase_progress == 100
        async with job.phase("POST_PROCESSING") as phase:
            await phase.update(50, "Lettering")
    assert job.state.phase.value == "COMPLETE"
    assert list(job.state.phases) == ["QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]


async def test_an_exception_fails_the_job_with_the_error_and_propagates(worker: Worker) -> None:
    await worker.create(owner="alice", job_id="w-2")
    job = worker.job("w-2")

    async def generate() -> None:
        async with job, job.phase("GENERATING", steps_total=3) as phase:
            await phase.step("panel-1", 60)
            raise GPUError("panel 2: out of memory")

    with pytest.raises(GPUError):
        await generate()
    assert job.state is not None
    assert job.state.phase.value == "FAILED"
    assert job.state.error is not None
    assert (job.state.error.code, job.state.error.message) == ("GPUError", "panel 2: out of memory")
    assert job.state.steps["panel-1"]["progress"] == 60  # where it stopped stays visible


class CodedError(Exception):
    def __init__(self, code: object, text: str) -> None:
        super().__init__(text)
        self.code = code


@pytest.mark.parametrize("exc", [
    GPUError("x" * 10_000),
    GPUError("out of memory\x00 at \ud800"),
    GPUError(""),
    CodedError("oom\x00" * 40, "m"),
    CodedError(7, "a code that is not text"),
], ids=["long", "nul-surrogate", "empty", "bad-code", "int-code"])
async def test_any_exception_fails_the_job(worker: Worker, exc: Exception) -> None:
    """Whatever the exception says, the job ends FAILED: a failure that cannot be written
    would leave it running for ever."""
    job_id = (await worker.create(owner="alice")).job_id
    job = worker.job(job_id)
    with pytest.raises(type(exc)):
        async with job:
            raise exc
    assert job.state is not None and job.state.phase.value == "FAILED", job.state
    assert job.state.error is not None and job.state.error.code and job.state.error.message


async def test_progress_never_goes_backwards_and_bad_values_are_refused(worker: Worker) -> None:
    await worker.create(owner="alice", job_id="w-3")
    async with worker.job("w-3", complete_on_exit=False) as job, job.phase("ANALYZING") as phase:
        await phase.update(70)
        late = await phase.update(30)  # a late report: acknowledged, ignored
        assert late.phase_progress == 70
        with pytest.raises(InvalidUpdate, match="phase_progress"):
            await phase.update(120)
    assert job.state is not None and job.state.phase.value == "ANALYZING"


async def test_a_job_that_already_ended_cannot_be_entered(worker: Worker) -> None:
    await worker.create(owner="alice", job_id="w-4")
    async with worker.job("w-4"):
        pass
    with pytest.raises(JobTerminal):
        await worker.job("w-4").__aenter__()


def test_terminal_phases_are_not_phase_blocks(worker: Worker) -> None:
    with pytest.raises(InvalidUpdate, match="terminal"):
        worker.job("x").phase("COMPLETE")
