"""``/v1/jobs/{job_id}/events``: the WebSocket's states as server-sent events, one job per
stream, for networks that block WebSockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from phasecast.errors import InvalidUpdate
from phasecast.fanout import Mailbox
from phasecast.model import validate_job_id
from phasecast.server.deps import authenticate, services
from phasecast.server.logs import job_id_var

router = APIRouter(prefix="/v1", tags=["streams"])

HEARTBEAT = ": ping\n\n"


def _resume_point(last_event_id: str | None, since: int | None) -> int:
    if last_event_id:
        try:
            value = int(last_event_id)
        except ValueError:
            raise InvalidUpdate("Last-Event-ID", "must be the integer seq of an event") from None
        if value < 0:
            raise InvalidUpdate("Last-Event-ID", "must not be negative")
        return value
    return since or 0


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    since: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    job_id_var.set(job_id)
    validate_job_id(job_id)
    caller = authenticate(request, allow_query=True)
    floor = _resume_point(last_event_id, since)
    found = services(request)
    tracker, metrics, settings = found.tracker, found.metrics, found.settings

    # Check access before the stream starts, so refusals are ordinary JSON responses.
    caller.require_read(await tracker.get(job_id))

    async def stream() -> AsyncIterator[str]:
        # Registered inside the generator, so the ``finally`` that unregisters always runs:
        # a response body that never starts leaves nothing behind.
        mailbox = Mailbox()
        mailbox.set_floor(job_id, floor)
        metrics.connections.labels("sse").inc()
        try:
            await tracker.hub.add(job_id, mailbox)
            state, change = await tracker.watched_state(job_id)
            mailbox.offer(change)
            yield f"retry: {settings.sse_retry_ms}\n\n"
            if state.terminal and state.seq <= floor:
                return
            # Metric children looked up once per stream, not once per event.
            sent_counter = metrics.messages.labels("sse")
            latency = metrics.latency.labels("sse")
            while True:
                if not await mailbox.wait(settings.ping_interval):
                    yield HEARTBEAT
                    continue
                for change in mailbox.take():
                    yield change.sse_frame()
                    sent_counter.inc()
                    latency.observe(max(0.0, time.time() - change.changed_at))
                    if change.terminal:
                        return
        finally:
            tracker.hub.remove(job_id, mailbox)
            metrics.conflated.inc(mailbox.conflated)
            metrics.connections.labels("sse").dec()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
