"""HTTP routes of the RunPod integration: the completion webhook RunPod calls, and the panel
submission a generation service calls."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from phasecast.integrations.pipeline import PanelSpec, RunPodPanels
from phasecast.integrations.runpod import (
    WEBHOOK_PATH,
    InvalidPayload,
    RunPodStatus,
    verify_webhook_token,
)
from phasecast.integrations.store import FailurePolicy
from phasecast.model import JOB_ID_PATTERN, STEP_ID_PATTERN, validate_job_id
from phasecast.server.auth import Principal
from phasecast.server.deps import error_body, principal, services

log = logging.getLogger("phasecast.integrations.runpod")

MAX_WEBHOOK_BYTES = 1024 * 1024

router = APIRouter(tags=["runpod"])
Caller = Annotated[Principal, Depends(principal)]


def panels_of(request: Request) -> RunPodPanels:
    found: RunPodPanels = request.app.state.runpod
    return found


@router.post(WEBHOOK_PATH)
async def runpod_webhook(
    request: Request,
    job: Annotated[str | None, Query(max_length=128)] = None,
    step: Annotated[str | None, Query(max_length=64)] = None,
    token: Annotated[str | None, Query(max_length=128)] = None,
) -> JSONResponse:
    """RunPod's completion webhook. Answers at once (RunPod retries slow answers) and applies
    the status in the background; repeated and late webhooks change nothing."""
    runpod = panels_of(request)
    if not job or not step or not token or not JOB_ID_PATTERN.match(job) or not STEP_ID_PATTERN.match(step):
        log.warning("RunPod webhook refused: the URL is not one Phasecast issued")
        return JSONResponse(error_body("forbidden", "this webhook URL was not issued by Phasecast "
                                       "(job, step and token query parameters are required)"), 403)
    if not verify_webhook_token(runpod.config.webhook_secret, job, step, token):
        log.warning("RunPod webhook refused: bad token", extra={"job_id": job})
        return JSONResponse(error_body("forbidden", "the webhook token does not match job and step; "
                                       "only URLs issued by Phasecast are accepted"), 403)
    raw = await request.body()
    if len(raw) > MAX_WEBHOOK_BYTES:
        return JSONResponse(error_body("invalid", f"the body exceeds {MAX_WEBHOOK_BYTES} bytes"), 413)
    try:
        status = RunPodStatus.parse(json.loads(raw))
    except ValueError as exc:
        return JSONResponse(error_body("invalid_json", f"the body is not JSON: {exc}"), 422)
    except InvalidPayload as exc:
        log.info("RunPod webhook rejected: %s", exc.message, extra={"job_id": job})
        return JSONResponse(error_body("invalid", exc.message, exc.field), 422)
    runpod.spawn(runpod.apply_webhook(job, step, status))
    return JSONResponse({"accepted": True})


class PanelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: str | None = Field(None, min_length=1, max_length=64, pattern=STEP_ID_PATTERN.pattern)
    input: dict[str, Any]


class SubmitPanels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    panels: list[PanelIn] = Field(min_length=1, max_length=200)
    on_failure: Literal["fail", "retry"] = "fail"
    max_retries: int | None = Field(None, ge=0, le=10)
    retry_with: Literal["run", "retry"] = "run"


@router.post("/v1/integrations/runpod/jobs/{job_id}/panels", status_code=202)
async def submit_panels(job_id: str, body: SubmitPanels, caller: Caller, request: Request) -> JSONResponse:
    """Draw a job's panels on RunPod: the job enters GENERATING with one step per panel, and
    enters POST_PROCESSING when all are done."""
    caller.require_write()
    validate_job_id(job_id)
    runpod = panels_of(request)
    retries = body.max_retries if body.max_retries is not None else (
        runpod.config.max_retries if body.on_failure == "retry" else 0
    )
    policy = FailurePolicy(on_failure=body.on_failure, max_retries=retries, retry_with=body.retry_with)
    specs = [PanelSpec(p.step or f"panel-{i}", p.input) for i, p in enumerate(body.panels, start=1)]
    records = await runpod.submit(job_id, specs, policy)
    return JSONResponse({"job_id": job_id, "panels": [p.public() for p in records]}, 202)


@router.get("/v1/integrations/runpod/jobs/{job_id}/panels")
async def list_panels(job_id: str, caller: Caller, request: Request) -> dict[str, Any]:
    """Each panel's RunPod job, status, output (image URLs and the like) and error."""
    state = await services(request).tracker.get(validate_job_id(job_id))
    caller.require_read(state)
    return {"job_id": job_id, "panels": [p.public() for p in await panels_of(request).store.panels(job_id)]}
