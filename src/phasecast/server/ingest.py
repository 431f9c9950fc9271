"""The thin path for progress reports: ``POST /v1/jobs/{id}/progress`` and the batch
``POST /v1/progress`` without the framework's per-request work.

A worker may send thousands of these a second, and most of a report's cost on the full
route is the framework's: routing, dependency injection, model validation, response
encoding. This ASGI layer answers the common case itself: a verified write token (from the
verifier's cache), a small JSON body of the documented fields with valid values, then one
``tracker.update_json`` (one engine round trip) and a reply built from the stored state's
JSON without parsing it. It applies the same limits as the route and answers the same bytes.

Anything else (no or bad token, another content type, a body that is large, not JSON or not
plainly valid) goes on to the full route, with what was read of the body handed on, so every
refusal keeps the route's own status and message. Errors from the tracker (unknown job, a
finished job, an engine outage) are answered here as the route's error handler would.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phasecast.errors import InvalidUpdate, PhasecastError
from phasecast.model import (
    MAX_MESSAGE_CHARS,
    MAX_STEPS,
    STEP_ID_PATTERN,
    STEP_STATUSES,
    WORKING_PHASES,
    ProgressUpdate,
    validate_update,
)
from phasecast.server.auth import Principal
from phasecast.server.deps import Services, error_response

_PATH = re.compile(r"/v1/jobs/([A-Za-z0-9][A-Za-z0-9._:-]{0,127})/progress")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_BATCH_PATH = "/v1/progress"
MAX_BATCH = 500  # as the batch route
# A report of every field at its longest is under 2.5 KB; larger bodies take the full route.
MAX_THIN_BODY = 4096
_PHASES = {p.value: p for p in WORKING_PHASES}
_FIELDS = frozenset(
    {"phase", "phase_progress", "step", "step_progress", "step_status", "steps_total", "message"}
)
_JSON_HEADERS = [(b"content-type", b"application/json")]


class ThinReports:
    """ASGI middleware; install it inside the request-context (logging) middleware."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        self.body_limit = min(MAX_THIN_BODY, services.settings.max_report_body_bytes)
        self.batch_limit = services.settings.max_batch_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        found = _PATH.fullmatch(path)
        if found is None and path != _BATCH_PATH:
            await self.app(scope, receive, send)
            return
        caller = self._worker(scope)
        if caller is None:
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        if found is None:
            body = await _small_body(receive, read, self.batch_limit)
            batch = None if body is None else _batch(body)
            if batch is None:
                await self.app(scope, _replay(read, receive), send)
                return
            await _respond(send, 200, await self._apply_batch(batch))
            return
        body = await _small_body(receive, read, self.body_limit)
        update = None if body is None else _update(body)
        if update is None:
            await self.app(scope, _replay(read, receive), send)
            return
        job_id = found.group(1)
        try:
            decided = await self.services.tracker.update_json(job_id, update)
        except PhasecastError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        reply = b'{"applied":%s,"state":%s}' % (
            b"true" if decided.applied else b"false",
            decided.state_json.encode(),
        )
        await _respond(send, 200, reply)

    async def _apply_batch(self, batch: list[tuple[str, ProgressUpdate]]) -> bytes:
        """As the batch route answers: a result per report, in order; reports of one job
        apply in the order given (they queue on its lock in the order they start)."""
        tracker = self.services.tracker

        async def apply(job_id: str, update: ProgressUpdate) -> dict[str, Any]:
            try:
                decided = await tracker.update_json(job_id, update)
            except PhasecastError as exc:
                error = {"code": exc.code, "message": exc.message}
                if isinstance(exc, InvalidUpdate):
                    error["field"] = exc.field
                return {"job_id": job_id, "error": error}
            state = json.loads(decided.state_json)
            return {"job_id": job_id, "applied": decided.applied, "seq": state["seq"],
                    "phase": state["phase"], "progress": state["progress"]}

        results = await asyncio.gather(*(apply(job_id, update) for job_id, update in batch))
        return json.dumps({"results": results}, separators=(",", ":"), ensure_ascii=False).encode()

    def _worker(self, scope: Scope) -> Principal | None:
        """The caller, if it is plainly a worker sending JSON; None sends it the long way."""
        token = None
        json_body = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer" and rest.strip():
                    token = rest.strip().decode("latin-1")
            elif name == b"content-type":
                json_body = value.split(b";", 1)[0].strip().lower() == b"application/json"
        if token is None or not json_body:
            return None
        try:
            caller = self.services.verifier.verify(token)
        except PhasecastError:
            return None
        return caller if caller.is_worker and not caller.expired else None

    async def _refuse(
        self, exc: PhasecastError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        response = error_response(Request(scope, receive), exc)  # as the route's handler answers
        await response(scope, receive, send)


async def _small_body(receive: Receive, read: list[Message], limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            return None  # the client went away: the full route says what happens then
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(read: list[Message], receive: Receive) -> Receive:
    pending = list(read)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _percent(value: Any) -> float | None:
    if type(value) is float:
        return value if 0.0 <= value <= 100.0 else None  # NaN fails both comparisons
    if type(value) is int:
        return float(value) if 0 <= value <= 100 else None
    return None


def _batch(body: bytes) -> list[tuple[str, ProgressUpdate]] | None:
    """Every report of a batch, if every one is plainly valid; None otherwise (the route
    then validates all of them before any applies, and names the one at fault)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if type(data) is not dict or data.keys() != {"updates"}:
        return None
    items = data["updates"]
    if type(items) is not list or not 1 <= len(items) <= MAX_BATCH:
        return None
    batch = []
    for item in items:
        if type(item) is not dict:
            return None
        job_id = item.pop("job_id", None)
        if type(job_id) is not str or not _JOB_ID.fullmatch(job_id):
            return None
        update = _update_of(item)
        if update is None:
            return None
        batch.append((job_id, update))
    return batch


def _update(body: bytes) -> ProgressUpdate | None:
    """The report, if it is plainly valid; None for anything the full route must judge."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _update_of(data)


def _update_of(data: Any) -> ProgressUpdate | None:
    if type(data) is not dict or not data.keys() <= _FIELDS or None in data.values():
        return None  # (a null field is refused by the full route)
    name = data.get("phase")
    phase = _PHASES.get(name) if type(name) is str else None
    if phase is None:
        return None
    values: dict[str, Any] = {}
    for name in ("phase_progress", "step_progress"):
        raw = data.get(name)
        if raw is not None:
            value = _percent(raw)
            if value is None or math.isinf(value):
                return None
            values[name] = value
    step = data.get("step")
    if step is not None and (type(step) is not str or not STEP_ID_PATTERN.fullmatch(step)):
        return None
    status = data.get("step_status")
    if status is not None and (status not in STEP_STATUSES or step is None):
        return None
    total = data.get("steps_total")
    if total is not None and (type(total) is not int or not 1 <= total <= MAX_STEPS):
        return None
    message = data.get("message")
    if message is not None:
        if type(message) is not str or len(message) > MAX_MESSAGE_CHARS:
            return None
        if not message.isascii():
            try:
                message.encode()
            except UnicodeEncodeError:  # a lone surrogate
                return None
    if step is not None and "phase_progress" in values:
        return None
    if "step_progress" in values and step is None:
        return None
    update = ProgressUpdate(
        phase,
        phase_progress=values.get("phase_progress"),
        step=step,
        step_progress=values.get("step_progress"),
        step_status=status,
        steps_total=total,
        message=message,
    )
    try:
        validate_update(update)  # the one authority; the checks above only pick the fast case
    except InvalidUpdate:
        return None
    return update


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
