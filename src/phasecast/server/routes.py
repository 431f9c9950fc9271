"""REST routes under ``/v1``.

The models here describe the wire format for FastAPI and the OpenAPI document (strict types:
no ``"50"`` or ``true`` for a number); every rule about values comes from ``phasecast.model``,
the one authority that the tracker, the batch route and the worker SDK also apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    WithJsonSchema,
    field_validator,
)
from pydantic.config import JsonDict

from phasecast.errors import InvalidUpdate, PhasecastError
from phasecast.model import (
    JOB_ID_PATTERN,
    JOB_ID_RULE,
    KIND_PATTERN,
    MAX_ERROR_CODE_CHARS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_CHARS,
    MAX_METADATA_BYTES,
    MAX_OWNER_CHARS,
    MAX_STEPS,
    STEP_ID_PATTERN,
    STEP_ID_RULE,
    STORED_TEXT_PATTERN,
    TERMINAL_PHASES,
    WORKING_PHASES,
    Outcome,
    Phase,
    ProgressUpdate,
    StepStatus,
    validate_job_id,
    validate_step_id,
    validate_update,
)
from phasecast.server.auth import Forbidden, Principal
from phasecast.server.deps import principal, services
from phasecast.server.jsonbody import JSONRoute
from phasecast.server.logs import job_id_var
from phasecast.server.openapi import METADATA_VALUE_REF, JobReply, JobStateModel, errors, ok

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=JSONRoute, strict_content_type=False)

MAX_BATCH = 500
# The error of a job failed without one (an empty /fail body).
UNSPECIFIED_ERROR = ("unspecified", "the worker reported a failure without details")

Caller = Annotated[Principal, Depends(principal)]
T = TypeVar("T")


def _rule(check: Callable[[Any], T]) -> AfterValidator:
    """A model rule as a pydantic validator: its problem becomes the field's error."""

    def run(value: Any) -> T:
        try:
            return check(value)
        except InvalidUpdate as exc:
            raise ValueError(exc.problem) from None

    return AfterValidator(run)


def _not_terminal(value: Any) -> Any:
    if isinstance(value, str) and value in {p.value for p in TERMINAL_PHASES}:
        raise ValueError(f"{value} is terminal; use the complete, fail or cancel call instead")
    return value


JobId = Annotated[
    str,
    _rule(validate_job_id),
    WithJsonSchema({"type": "string", "pattern": JOB_ID_PATTERN.pattern, "description": JOB_ID_RULE}),
]
StepId = Annotated[
    str,
    _rule(validate_step_id),
    WithJsonSchema({"type": "string", "pattern": STEP_ID_PATTERN.pattern, "description": STEP_ID_RULE}),
]
WorkingPhase = Annotated[
    Phase,
    BeforeValidator(_not_terminal),
    WithJsonSchema({"type": "string", "enum": [p.value for p in WORKING_PHASES],
                    "description": "a working phase; end a job with complete, fail or cancel"}),
]
def _integral(value: Any) -> Any:
    # JSON has one number type: 6.0 is the integer 6 (as JSON Schema says); 6.5 is refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Percent = Annotated[StrictFloat, Field(ge=0, le=100, allow_inf_nan=False)]
StepsTotal = Annotated[StrictInt, Field(ge=1, le=MAX_STEPS), BeforeValidator(_integral)]
# Text a job keeps: the OpenAPI document carries validate_text's NUL rule as a pattern
# (the rule itself is applied, with its own message, by the model).
_STORED: JsonDict = {"pattern": STORED_TEXT_PATTERN}
Message = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS, json_schema_extra=_STORED)]
JobIdPath = Annotated[
    str,
    Path(description=JOB_ID_RULE, json_schema_extra={"pattern": JOB_ID_PATTERN.pattern}),
]


def _without_nulls(schema: dict[str, Any]) -> None:
    """Optional fields are left out, never sent as null: publish them that way."""
    for prop in schema.get("properties", {}).values():
        members = prop.get("anyOf")
        if members and {"type": "null"} in members:
            rest = [m for m in members if m != {"type": "null"}]
            del prop["anyOf"]
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class Strict(BaseModel):
    """A request body: unknown fields refused, optional fields left out rather than null."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_without_nulls)

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null: leave the field out instead")
        return value


class CreateJob(Strict):
    kind: str = Field("comic", min_length=1, max_length=64, pattern=KIND_PATTERN.pattern)
    job_id: JobId | None = None
    owner: str | None = Field(None, min_length=1, max_length=MAX_OWNER_CHARS, json_schema_extra=_STORED)
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra={"propertyNames": _STORED, "additionalProperties": {"$ref": METADATA_VALUE_REF}},
        description=f"free JSON object: at most {MAX_METADATA_BYTES} bytes encoded, nested at "
        f"most {MAX_JSON_DEPTH} levels, finite numbers and valid Unicode only",
    )


def _report_schema(schema: dict[str, Any]) -> None:
    _without_nulls(schema)
    # The rules between fields, as validate_update applies them.
    schema["dependentRequired"] = {"step_progress": ["step"], "step_status": ["step"]}
    schema["not"] = {"required": ["step", "phase_progress"]}


class ProgressReport(Strict):
    """One of: ``phase`` (with ``phase_progress``), or a ``step`` report (``step_progress``,
    ``step_status``); ``phase_progress`` and ``step`` exclude each other."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_report_schema)

    phase: WorkingPhase
    phase_progress: Percent | None = None
    step: StepId | None = None
    step_progress: Percent | None = None
    step_status: StepStatus | None = None
    steps_total: StepsTotal | None = None
    message: Message | None = None

    def update(self) -> ProgressUpdate:
        return ProgressUpdate(
            phase=self.phase,
            phase_progress=self.phase_progress,
            step=self.step,
            step_progress=self.step_progress,
            step_status=self.step_status,
            steps_total=self.steps_total,
            message=self.message,
        )


class CompleteJob(Strict):
    message: Message | None = None


class ErrorInfo(Strict):
    code: str = Field(min_length=1, max_length=MAX_ERROR_CODE_CHARS, json_schema_extra=_STORED)
    message: str = Field(min_length=1, max_length=MAX_ERROR_MESSAGE_CHARS, json_schema_extra=_STORED)


class FailJob(Strict):
    error: ErrorInfo | None = Field(None, description="what went wrong; without it the job's error is "
                                    f"{{code: {UNSPECIFIED_ERROR[0]!r}, message: {UNSPECIFIED_ERROR[1]!r}}}")
    message: Message | None = None


class CancelJob(Strict):
    reason: Message | None = None


class JobList(BaseModel):
    jobs: list[JobStateModel]


class HistoryEvent(BaseModel):
    seq: int
    at: str
    phase: Phase
    phase_progress: float
    progress: float
    message: str


class JobHistory(BaseModel):
    job_id: str
    events: list[HistoryEvent]


def _reply(outcome: Outcome) -> dict[str, Any]:
    return {"applied": outcome.applied, "state": outcome.state.to_dict()}


def _job_path(job_id: str) -> str:
    checked = validate_job_id(job_id)
    job_id_var.set(checked)
    return checked


def _checked(update: ProgressUpdate, prefix: str = "") -> ProgressUpdate:
    try:
        validate_update(update)
    except InvalidUpdate as exc:
        if not prefix:
            raise
        raise InvalidUpdate(f"{prefix}{exc.field}", exc.problem) from None
    return update


@router.post("/jobs", status_code=201, response_model=None,
             responses=ok(JobStateModel, 201) | errors(400, 401, 403, 409, 413, 415, 422, 503))
async def create_job(body: CreateJob, caller: Caller, request: Request) -> JSONResponse:
    """Create a job (scope jobs:write). Answers its first state, with a Location header."""
    caller.require_write()
    tracker = services(request).tracker
    if body.job_id is not None:
        job_id_var.set(body.job_id)
    state = await tracker.create(
        body.kind, owner=body.owner or caller.sub, job_id=body.job_id, metadata=body.metadata
    )
    return JSONResponse(state.to_dict(), 201, headers={"Location": f"/v1/jobs/{state.job_id}"})


@router.get("/jobs", response_model=None, responses=ok(JobList) | errors(401, 403, 413, 422, 503))
async def list_jobs(
    caller: Caller,
    request: Request,
    status: Annotated[Literal["active", "all"], Query()] = "all",
    owner: Annotated[str | None, Query(min_length=1, max_length=MAX_OWNER_CHARS)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The caller's jobs, newest first; jobs:write and admin tokens may list anyone's."""
    caller.require_read_scope()
    if owner is not None and owner != caller.sub and not caller.is_worker:
        raise Forbidden("only jobs:write or admin tokens may list another user's jobs")
    if owner is None and not caller.is_worker:
        owner = caller.sub
    jobs = await services(request).tracker.list(owner, active_only=status == "active", limit=limit)
    return {"jobs": [job.to_dict() for job in jobs]}


@router.get("/jobs/{job_id}", response_model=None,
            responses=ok(JobStateModel) | errors(401, 403, 404, 413, 422, 503))
async def get_job(job_id: JobIdPath, caller: Caller, request: Request) -> dict[str, Any]:
    """The current state of one job."""
    state = await services(request).tracker.get(_job_path(job_id))
    caller.require_read(state)
    return state.to_dict()


@router.get("/jobs/{job_id}/history", response_model=None,
            responses=ok(JobHistory) | errors(401, 403, 404, 413, 422, 503))
async def job_history(
    job_id: JobIdPath,
    caller: Caller,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The most recent accepted changes of a job, oldest first."""
    tracker = services(request).tracker
    state = await tracker.get(_job_path(job_id))
    caller.require_read(state)
    return {"job_id": job_id, "events": await tracker.engine.history(job_id, limit=limit)}


@router.post("/jobs/{job_id}/progress", response_model=None,
             responses=ok(JobReply) | errors(400, 401, 403, 404, 409, 413, 415, 422, 503))
async def report_progress(
    job_id: JobIdPath, body: ProgressReport, caller: Caller, request: Request
) -> dict[str, Any]:
    """A worker's progress report (scope jobs:write)."""
    caller.require_write()
    update = _checked(body.update())
    return _reply(await services(request).tracker.update(_job_path(job_id), update))


class BatchItem(ProgressReport):
    job_id: JobId


class ProgressBatch(Strict):
    updates: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH)


class BatchError(BaseModel):
    code: str
    message: str
    field: str | None = None


class BatchResult(BaseModel):
    job_id: str
    applied: bool | None = None
    seq: int | None = None
    phase: Phase | None = None
    progress: float | None = None
    error: BatchError | None = None


class BatchReply(BaseModel):
    results: list[BatchResult]


@router.post("/progress", response_model=None,
             responses=ok(BatchReply) | errors(400, 401, 403, 413, 415, 422, 503))
async def report_progress_batch(
    body: ProgressBatch, caller: Caller, request: Request
) -> dict[str, Any]:
    """Many reports in one request, for backends that report often or for many jobs: the
    HTTP and auth cost is paid once. Every report is validated before any applies (422 names
    the report, as ``updates.3.phase_progress``); reports of one job apply in the order
    given, and one that fails on its job's state (unknown, finished) does not stop the
    others. Each result is ``{job_id, applied, seq, phase, progress}`` or
    ``{job_id, error: {code, message, field}}``, in the order of the reports."""
    caller.require_write()
    tracker = services(request).tracker
    updates = [_checked(item.update(), f"updates.{i}.") for i, item in enumerate(body.updates)]

    async def apply(job_id: str, update: ProgressUpdate) -> dict[str, Any]:
        try:
            outcome = await tracker.update(job_id, update)
        except PhasecastError as exc:
            error = {"code": exc.code, "message": exc.message}
            if isinstance(exc, InvalidUpdate):
                error["field"] = exc.field
            return {"job_id": job_id, "error": error}
        state = outcome.state
        return {"job_id": job_id, "applied": outcome.applied, "seq": state.seq,
                "phase": state.phase.value, "progress": state.progress}

    # Started in order, so reports of one job queue on its lock in the order given.
    results = await asyncio.gather(
        *(apply(item.job_id, update) for item, update in zip(body.updates, updates, strict=True))
    )
    return {"results": results}


@router.post("/jobs/{job_id}/complete", response_model=None,
             responses=ok(JobReply) | errors(400, 401, 403, 404, 409, 413, 415, 422, 503))
async def complete_job(
    job_id: JobIdPath, caller: Caller, request: Request, body: CompleteJob | None = None
) -> dict[str, Any]:
    """End a job as COMPLETE (scope jobs:write). The body is optional."""
    caller.require_write()
    message = body.message if body else None
    return _reply(await services(request).tracker.complete(_job_path(job_id), message))


@router.post("/jobs/{job_id}/fail", response_model=None,
             responses=ok(JobReply) | errors(400, 401, 403, 404, 409, 413, 415, 422, 503))
async def fail_job(
    job_id: JobIdPath, caller: Caller, request: Request, body: FailJob | None = None
) -> dict[str, Any]:
    """End a job as FAILED with an error (scope jobs:write). The body is optional."""
    caller.require_write()
    code, error_message = UNSPECIFIED_ERROR
    if body is not None and body.error is not None:
        code, error_message = body.error.code, body.error.message
    outcome = await services(request).tracker.fail(
        _job_path(job_id), code, error_message, message=body.message if body else None
    )
    return _reply(outcome)


@router.post("/jobs/{job_id}/cancel", response_model=None,
             responses=ok(JobReply) | errors(400, 401, 403, 404, 409, 413, 415, 422, 503))
async def cancel_job(
    job_id: JobIdPath, caller: Caller, request: Request, body: CancelJob | None = None
) -> dict[str, Any]:
    """End a job as CANCELLED: its owner (jobs:read) or a jobs:write token. The body is
    optional."""
    tracker = services(request).tracker
    state = await tracker.get(_job_path(job_id))
    if not caller.can_cancel(state):
        raise Forbidden(f"job {job_id!r} belongs to another user")
    return _reply(await tracker.cancel(job_id, body.reason if body else None))
