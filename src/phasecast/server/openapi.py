"""The OpenAPI document is the contract: response models for what the routes answer, the
error body every refusal carries, and a final pass over the generated document so that
every operation (ours and the integrations') documents the errors it can return."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from phasecast.model import JOB_ID_PATTERN, JOB_ID_RULE, STEP_STATUSES, STORED_TEXT_PATTERN, Phase


class FieldProblem(BaseModel):
    field: str | None = None
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable: invalid, invalid_json, unauthorized, forbidden, "
                      "not_found, conflict, terminal, too_large, unsupported_media_type, "
                      "method_not_allowed, request_timeout, headers_too_large, bad_request, unavailable")
    message: str = Field(description="what is wrong and how to fix it")
    field: str | None = Field(None, description="the offending field, e.g. updates.3.phase_progress")
    details: list[FieldProblem] | None = Field(None, description="every problem found, for 422")


class ErrorBody(BaseModel):
    error: ErrorDetail


class PhaseSpan(BaseModel):
    started_at: str
    finished_at: str | None


class StepState(BaseModel):
    progress: float
    status: str = Field(json_schema_extra={"enum": list(STEP_STATUSES)})


class JobErrorModel(BaseModel):
    code: str
    message: str


class JobStateModel(BaseModel):
    """The whole state of a job, as every read, push and write reply carries it."""

    job_id: str
    owner: str
    kind: str
    phase: Phase
    phase_progress: float
    progress: float
    message: str
    eta_seconds: float | None
    seq: int
    epoch: str
    created_at: str
    updated_at: str
    phases: dict[str, PhaseSpan]
    steps: dict[str, StepState]
    steps_total: int | None
    error: JobErrorModel | None
    metadata: dict[str, Any]


class JobReply(BaseModel):
    applied: bool = Field(description="false for a late, duplicate or no-op report: nothing changed")
    state: JobStateModel


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "invalid_json: the body is not JSON, or not UTF-8",
    401: "unauthorized: no token, or a token that is invalid or expired",
    403: "forbidden: the token may not do this (another user's job, missing scope)",
    404: "not_found: no such job (or it has expired)",
    405: "method_not_allowed: the path exists but not with this method (see the Allow header)",
    408: "request_timeout: the request's body did not arrive in full in time (docs/protocol.md, Limits)",
    409: "conflict (the job id exists) or terminal (the job has ended)",
    413: "too_large: the body is over this route's limit (docs/protocol.md, Limits)",
    415: "unsupported_media_type: a body with a Content-Type other than JSON",
    422: "invalid: a value out of range or malformed; `field` names it",
    503: "unavailable: the engine cannot be reached; retry",
}


def ok(model: type[BaseModel], status: int = 200) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": "Success"}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


_ERROR_REF = "#/components/schemas/ErrorBody"


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": _ERROR_REF}}},
    }


METADATA_VALUE = "MetadataValue"
METADATA_VALUE_REF = f"#/components/schemas/{METADATA_VALUE}"


def _metadata_value_schema() -> dict[str, Any]:
    """A value inside a job's metadata: any JSON whose strings and keys hold no NUL (the
    archive cannot keep one; model.check_json with stored=True)."""
    text = {"pattern": STORED_TEXT_PATTERN}
    return {"anyOf": [
        {"type": "string", **text},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": METADATA_VALUE_REF}},
        {"type": "object", "propertyNames": text, "additionalProperties": {"$ref": METADATA_VALUE_REF}},
    ]}


def install_openapi(app: FastAPI) -> None:
    """Generate the document once, then make it true for every operation: FastAPI's own
    validation-error body is replaced by ours, every operation may answer 413 (each route
    has a body cap), each one with a body 408 (its body did not arrive in time), each one
    that takes a bearer token 401, and every job id in a path carries the job id pattern."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title, version=app.version, summary=app.summary,
            description=app.description, routes=app.routes,
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        if "ErrorBody" not in schemas:
            schemas.update(_error_schemas())
        schemas[METADATA_VALUE] = _metadata_value_schema()
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    # Every route checks a job id in its path with model.validate_job_id.
                    if parameter.get("in") == "path" and parameter.get("name") == "job_id":
                        parameter["schema"].setdefault("pattern", JOB_ID_PATTERN.pattern)
                        parameter["schema"].setdefault("description", JOB_ID_RULE)
                responses: dict[str, Any] = operation.setdefault("responses", {})
                for status, response in list(responses.items()):
                    if "HTTPValidationError" in str(response):
                        responses[status] = _error_response(int(status))
                responses.setdefault("413", _error_response(413))
                if "requestBody" in operation:
                    responses.setdefault("408", _error_response(408))
                if operation.get("security"):
                    responses.setdefault("401", _error_response(401))
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _error_schemas() -> dict[str, Any]:
    from fastapi.openapi.utils import get_openapi as build

    probe = FastAPI()

    @probe.get("/", responses=errors(400))
    def _probe() -> None:  # pragma: no cover - only its schema is used
        return None

    built: dict[str, Any] = build(title="", version="", routes=probe.routes)["components"]["schemas"]
    return built
