"""REST routes under ``/v1``."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from phasecast.errors import InvalidUpdate, PhasecastError
from phasecast.model import (
    MAX_MESSAGE_CHARS,
    MAX_STEPS,
    Outcome,
    Phase,
    ProgressUpdate,
    validate_job_id,
)
from phasecast.server.auth import Forbidden, Principal
from phasecast.server.deps import principal, services
from phasecast.server.logs import job_id_var

router = APIRouter(prefix="/v1", tags=["jobs"])

MAX_BATCH = 500

Caller = Annotated[Principal, Depends(principal)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateJob(Strict):
    kind: str = Field("comic", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    job_id: str | None = Field(None, max_length=128)
    owner: str | None = Field(None, min_length=1, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ProgressReport(Strict):
    phase: Phase
    phase_progress: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    step: str | None = Field(None, min_length=1, max_length=64)
    step_progress: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    step_status: Literal["pending", "running", "done", "failed"] | None = None
    steps_total: int | None = Field(None, ge=1, le=MAX_STEPS)
    message: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


class CompleteJob(Strict):
    message: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


class ErrorInfo(Strict):
    code: str = Field(min_length=1, max_length=64)
    message: str = Field(min_length=1, max_length=2000)


class FailJob(Strict):
    error: ErrorInfo
    message: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


class CancelJob(Strict):
    reason: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


def _reply(outcome: Outcome) -> dict[str, Any]:
    return {"applied": outcome.applied, "state": outcome.state.to_dict()}


def _job_path(job_id: str) -> str:
    job_id_var.set(job_id)
    return validate_job_id(job_id)


@router.post("/jobs", status_code=201)
async def create_job(body: CreateJob, caller: Caller, request: Request) -> JSONResponse:
    caller.require_write()
    tracker = services(request).tracker
    if body.job_id is not None:
        validate_job_id(body.job_id)
        job_id_var.set(body.job_id)
    state = await tracker.create(
        body.kind, owner=body.owner or caller.sub, job_id=body.job_id, metadata=body.metadata
    )
    return JSONResponse(state.to_dict(), 201, headers={"Location": f"/v1/jobs/{state.job_id}"})


@router.get("/jobs")
async def list_jobs(
    caller: Caller,
    request: Request,
    status: Annotated[Literal["active", "all"], Query()] = "all",
    owner: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    if owner is not None and owner != caller.sub and not caller.is_worker:
        raise Forbidden("only jobs:write or admin tokens may list another user's jobs")
    if owner is None and not caller.is_worker:
        owner = caller.sub
    jobs = await services(request).tracker.list(owner, active_only=status == "active", limit=limit)
    return {"jobs": [job.to_dict() for job in jobs]}


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, caller: Caller, request: Request) -> dict[str, Any]:
    state = await services(request).tracker.get(_job_path(job_id))
    caller.require_read(state)
    return state.to_dict()


@router.get("/jobs/{job_id}/history")
async def job_history(
    job_id: str,
    caller: Caller,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    tracker = services(request).tracker
    state = await tracker.get(_job_path(job_id))
    caller.require_read(state)
    return {"job_id": job_id, "events": await tracker.engine.history(job_id, limit=limit)}


def _update_of(body: ProgressReport) -> ProgressUpdate:
    if body.step_status is not None and body.step is None:
        raise InvalidUpdate("step", "is required when step_status is given")
    return ProgressUpdate(
        phase=body.phase,
        phase_progress=body.phase_progress,
        step=body.step,
        step_progress=body.step_progress,
        step_status=body.step_status,
        steps_total=body.steps_total,
        message=body.message,
    )


@router.post("/jobs/{job_id}/progress")
async def report_progress(
    job_id: str, body: ProgressReport, caller: Caller, request: Request
) -> dict[str, Any]:
    caller.require_write()
    update = _update_of(body)
    return _reply(await services(request).tracker.update(_job_path(job_id), update))


class BatchItem(ProgressReport):
    job_id: str = Field(min_length=1, max_length=128)


class ProgressBatch(Strict):
    updates: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH)


@router.post("/progress")
async def report_progress_batch(
    body: ProgressBatch, caller: Caller, request: Request
) -> dict[str, Any]:
    """Many reports in one request, for backends that report often or for many jobs: the
    HTTP and auth cost is paid once. Reports of one job apply in the order given; one that
    fails does not stop the others. Each result is ``{job_id, applied, seq, phase, progress}``
    or ``{job_id, error: {code, message, field}}``, in the order of the reports."""
    caller.require_write()
    tracker = services(request).tracker

    async def apply(item: BatchItem) -> dict[str, Any]:
        try:
            outcome = await tracker.update(validate_job_id(item.job_id), _update_of(item))
        except PhasecastError as exc:
            error = {"code": exc.code, "message": exc.message}
            if isinstance(exc, InvalidUpdate):
                error["field"] = exc.field
            return {"job_id": item.job_id, "error": error}
        state = outcome.state
        return {"job_id": item.job_id, "applied": outcome.applied, "seq": state.seq,
                "phase": state.phase.value, "progress": state.progress}

    # Started in order, so reports of one job queue on its lock in the order given.
    results = await asyncio.gather(*(apply(item) for item in body.updates))
    return {"results": results}


@router.post("/jobs/{job_id}/complete")
async def complete_job(
    job_id: str, caller: Caller, request: Request, body: CompleteJob | None = None
) -> dict[str, Any]:
    caller.require_write()
    message = body.message if body else None
    return _reply(await services(request).tracker.complete(_job_path(job_id), message))


@router.post("/jobs/{job_id}/fail")
async def fail_job(job_id: str, body: FailJob, caller: Caller, request: Request) -> dict[str, Any]:
    caller.require_write()
    outcome = await services(request).tracker.fail(
        _job_path(job_id), body.error.code, body.error.message, message=body.message
    )
    return _reply(outcome)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(
    job_id: str, caller: Caller, request: Request, body: CancelJob | None = None
) -> dict[str, Any]:
    tracker = services(request).tracker
    state = await tracker.get(_job_path(job_id))
    if not caller.can_cancel(state):
        raise Forbidden(f"job {job_id!r} belongs to another user")
    return _reply(await tracker.cancel(job_id, body.reason if body else None))
