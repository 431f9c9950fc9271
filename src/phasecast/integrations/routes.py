"""HTTP routes of the RunPod integration: the completion webhook RunPod calls, and the panel
submission a generation service calls."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from phasecast.integrations.pipeline import PanelSpec, RunPodPanels
from phasecast.integrations.runpod import (
    WEBHOOK_PATH,
    InvalidPayload,
    RunPodStatus,
    load_json,
    verify_webhook_token,
)
from phasecast.integrations.store import FailurePolicy
from phasecast.model import JOB_ID_PATTERN, STEP_ID_PATTERN, validate_job_id
from phasecast.server.auth import Principal
from phasecast.server.deps import error_body, principal, services
from phasecast.server.guard import DRAIN_BYTES, drain
from phasecast.server.jsonbody import JSONRoute

log = logging.getLogger("phasecast.integrations.runpod")

MAX_WEBHOOK_BYTES = 1024 * 1024

# JSONRoute: bodies bounded, the token checked before they are read, parsed strictly (the
# webhook reads its own body, after checking its URL token).
router = APIRouter(tags=["runpod"], route_class=JSONRoute)
Caller = Annotated[Principal, Depends(principal)]


def panels_of(request: Request) -> RunPodPanels:
    found: RunPodPanels = request.app.state.runpod
    return found


SUBMISSION_PATTERN = re.compile(r"[0-9a-f]{32}")


@router.post(WEBHOOK_PATH)
async def runpod_webhook(request: Request) -> JSONResponse:
    """RunPod's completion webhook. Answers at once (RunPod retries slow answers) and applies
    the status in the background; repeated and late webhooks change nothing.

    Refusals: 403 ``forbidden`` for a URL Phasecast did not issue (missing, malformed or
    forged ``job``/``step``/``token``), 413 ``too_large`` for a body over 1 MiB, 400
    ``invalid_json`` for a body that is not UTF-8 JSON, 422 ``invalid`` for JSON that is not a
    RunPod status (naming the field)."""
    runpod = panels_of(request)
    query = request.query_params
    job, step, token = query.get("job"), query.get("step"), query.get("token")
    submission = query.get("submission")
    # Each once: with a parameter repeated, which value counts would depend on the reader.
    repeated = any(len(query.getlist(name)) > 1 for name in ("job", "step", "token", "submission"))
    if (repeated or not job or not step or not token or len(token) > 128
            or not JOB_ID_PATTERN.fullmatch(job) or not STEP_ID_PATTERN.fullmatch(step)
            or (submission is not None and not SUBMISSION_PATTERN.fullmatch(submission))):
        log.warning("RunPod webhook refused: the URL is not one Phasecast issued")
        return JSONResponse(error_body("forbidden", "this webhook URL was not issued by Phasecast "
                                       "(job, step and token query parameters are required)"), 403)
    if not verify_webhook_token(runpod.config.webhook_secret, job, step, token):
        log.warning("RunPod webhook refused: bad token", extra={"job_id": job})
        return JSONResponse(error_body("forbidden", "the webhook token does not match job and step; "
                                       "only URLs issued by Phasecast are accepted"), 403)
    raw = await _bounded_body(request, MAX_WEBHOOK_BYTES)
    if raw is None:
        return JSONResponse(error_body("too_large", f"the body exceeds {MAX_WEBHOOK_BYTES} bytes"), 413,
                            headers={"Connection": "close"})
    try:
        status = RunPodStatus.parse(load_json(raw))
    except InvalidPayload as exc:
        log.info("RunPod webhook rejected: %s", exc.message, extra={"job_id": job})
        return JSONResponse(error_body("invalid", exc.message, exc.field), 422)
    except ValueError as exc:
        return JSONResponse(error_body("invalid_json", f"the body is not JSON: {exc}"), 400)
    runpod.spawn(runpod.apply_webhook(job, step, status, submission))
    return JSONResponse({"accepted": True})


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to pass ``limit`` (by its Content-Length, or
    while it streams in): never more than ``limit`` bytes are held."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Read a body only a little over the cap to its end, so the sender reads the 413
        # rather than a reset (as the request guard does).
        await drain(request.receive, int(declared) if int(declared) <= limit + DRAIN_BYTES else DRAIN_BYTES)
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await drain(request.receive)
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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
