"""The OpenAPI description of a job state (``server/openapi.py``) is written beside the
state itself (``model.JobState``): this keeps the two from drifting apart."""

from __future__ import annotations

from datetime import UTC, datetime

from phasecast.model import new_job
from phasecast.server.openapi import JobStateModel


def test_the_documented_state_has_exactly_the_fields_of_the_wire_state() -> None:
    state = new_job(job_id="doc", owner="alice", kind="comic", metadata={"a": 1},
                    now=datetime(2026, 11, 29, tzinfo=UTC))
    wire = state.to_dict()
    assert set(JobStateModel.model_fields) == set(wire)
    # And a real state validates against the documented one.
    assert JobStateModel.model_validate(wire).model_dump(mode="json")["job_id"] == "doc"
