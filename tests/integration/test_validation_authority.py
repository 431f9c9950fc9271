"""One authority for what may be stored (``phasecast.model``), applied the same way by the
in-process tracker (both engines) and the worker SDK, before anything is written or sent."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any, get_args

import pytest
from tests.support.process import free_port

from phasecast import model
from phasecast.errors import InvalidUpdate, JobNotFound
from phasecast.model import Phase, ProgressUpdate
from phasecast.tracker import ProgressTracker
from phasecast.worker import remote_worker

SOURCE = Path(model.__file__).parent


def test_errors_depend_on_nothing_else_in_the_package() -> None:
    tree = ast.parse((SOURCE / "errors.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.startswith("phasecast")]


def test_step_statuses_are_listed_once() -> None:
    assert get_args(model.StepStatus) == model.STEP_STATUSES
    assert model.STEP_STATUSES == ("pending", "running", "done", "failed")


@pytest.mark.parametrize("bad", ["abc\n", "abc\r", "", "-a", "a b", "a" * 129, "é", "a{b}", 5, None])
def test_job_ids_are_matched_whole(bad: Any) -> None:
    with pytest.raises(InvalidUpdate) as caught:
        model.validate_job_id(bad)
    assert caught.value.field == "job_id"
    assert "letters, digits" in caught.value.message
    assert not model.is_job_id(bad)


REFUSED_UPDATES = [
    (ProgressUpdate(Phase.GENERATING, step_status="done"), "step"),
    (ProgressUpdate(Phase.GENERATING, step_progress=5.0), "step"),
    (ProgressUpdate(Phase.GENERATING, step="p1", phase_progress=5.0), "phase_progress"),
    (ProgressUpdate(Phase.GENERATING, phase_progress=math.nan), "phase_progress"),
    (ProgressUpdate(Phase.GENERATING, phase_progress=True), "phase_progress"),  # type: ignore[arg-type]
    (ProgressUpdate(Phase.GENERATING, phase_progress="50"), "phase_progress"),  # type: ignore[arg-type]
    (ProgressUpdate(Phase.GENERATING, step="p1", steps_total=2.0), "steps_total"),  # type: ignore[arg-type]
    (ProgressUpdate(Phase.GENERATING, step="p1\n"), "step"),
    (ProgressUpdate(Phase.GENERATING, message="\ud800"), "message"),
    (ProgressUpdate(Phase.COMPLETE), "phase"),
]


@pytest.mark.parametrize(("update", "field"), REFUSED_UPDATES)
async def test_the_in_process_tracker_refuses_what_rest_refuses(
    tracker: ProgressTracker, update: ProgressUpdate, field: str
) -> None:
    job = await tracker.create(owner="alice")
    with pytest.raises(InvalidUpdate) as caught:
        await tracker.update(job.job_id, update)
    assert caught.value.field == field
    assert await tracker.get(job.job_id) == job


REFUSED_METADATA: list[tuple[dict[str, Any], str]] = [
    ({"a": math.nan}, "metadata.a"),
    ({"a": [1, math.inf]}, "metadata.a.1"),
    ({"a": "\udc00"}, "metadata.a"),
    ({"\ud800": 1}, "metadata.\ud800"),
    ({"a": {1, 2}}, "metadata.a"),
    ({"a": b"bytes"}, "metadata.a"),
    ({1: "non-string key"}, "metadata"),
]


@pytest.mark.parametrize(("metadata", "field"), REFUSED_METADATA)
async def test_the_in_process_tracker_stores_no_unreadable_metadata(
    tracker: ProgressTracker, metadata: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidUpdate) as caught:
        await tracker.create(owner="alice", job_id="refused-meta", metadata=metadata)
    assert caught.value.field == field
    with pytest.raises(JobNotFound):
        await tracker.get("refused-meta")


async def test_metadata_nests_at_most_32_levels(tracker: ProgressTracker) -> None:
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(31):
        deep = {"n": deep}
    assert (await tracker.create(owner="alice", metadata=deep)).metadata == deep
    with pytest.raises(InvalidUpdate, match="deeper than 32"):
        await tracker.create(owner="alice", metadata={"n": deep})


async def test_the_worker_sdk_refuses_before_sending() -> None:
    # Nothing listens on this port: a request would end in EngineUnavailable after retries,
    # so an InvalidUpdate proves the SDK refused before sending anything.
    async with remote_worker(f"http://127.0.0.1:{free_port()}", "token", timeout=1) as worker:
        with pytest.raises(InvalidUpdate) as caught:
            worker.job("abc\n")
        assert caught.value.field == "job_id"
        with pytest.raises(InvalidUpdate):
            await worker.create(job_id="a/b", owner="alice")
        with pytest.raises(InvalidUpdate) as caught:
            await worker.create(owner="alice", metadata={"a": math.inf})
        assert caught.value.field == "metadata.a"
        with pytest.raises(InvalidUpdate) as caught:
            await worker.backend.update("job-1", ProgressUpdate(Phase.GENERATING, step_status="done"))
        assert caught.value.field == "step"
