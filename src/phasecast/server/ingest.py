"""The thin path for progress reports: ``POST /v1/jobs/{id}/progress`` and the batch
``POST /v1/progress`` without the framework's per-request work.

A worker may send thousands of these a second, and most of a report's cost on the full
route is the framework's: routing, dependency injection, model validation, response
encoding. The thin path answers the common case itself: a verified write token (from the
verifier's cache, not expired), a small JSON body of the documented fields with valid
values, then one ``tracker.update_json`` (a batch: one ``tracker.update_many_json``) and a
reply built from the stored state's JSON without parsing it. It applies the same limits as
the route and answers the same bytes.

Anything else (no or bad token, another content type, a body that is large, chunked, not
JSON or not plainly valid, ``Expect: 100-continue``, a CORS request) goes on to the full
route, with what was read of the body handed on, so every refusal keeps the route's own
status and message. Errors from the tracker (unknown job, a finished job, an engine outage)
are answered here as the route's error handler would.

It runs in two places, sharing ``Thin`` (the decisions, the work and the answers):

- ``ReportProtocol``, uvicorn's HTTP protocol (with the SSE seam of ``sse_transport``) that
  ``phasecast serve`` runs: it takes these requests as the parser reads them, without the
  ASGI scope, cycle, middleware or framework, and hands everything else to uvicorn's own
  request handling. Pipelined requests keep their order: a thin request is queued behind a
  running one exactly as uvicorn queues its own.
- ``ThinReports``, the outermost ASGI middleware of the app: the same path for any other
  ASGI server, and for ``PHASECAST_INGEST_TRANSPORT=asgi``.

Both give the request its id (``X-Request-ID`` if the client sent a sane one, echoed) and
write the access-log line that ``server/logs.py`` writes for every other request (at debug
for a 2xx, so it costs one level check when debug is off).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Iterator
from typing import Any, cast

from prometheus_client.core import CounterMetricFamily, Metric
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from phasecast.errors import InvalidUpdate, PhasecastError
from phasecast.model import (
    MAX_MESSAGE_CHARS,
    MAX_STEPS,
    STEP_ID_PATTERN,
    STEP_STATUSES,
    WORKING_PHASES,
    ProgressUpdate,
    loads_untrusted,
    validate_update,
)
from phasecast.server.deps import STATUS_BY_ERROR, Services, error_body
from phasecast.server.guard import BodyTimedOut, TimedOut, timed
from phasecast.server.logs import (
    _access_level,
    _next_request_id,
    access_log,
    job_id_var,
    request_id_var,
    sane_request_id,
)
from phasecast.server.sse_transport import HttpProtocol

log = logging.getLogger("phasecast.server")

_PATH = re.compile(r"/v1/jobs/([A-Za-z0-9][A-Za-z0-9._:-]{0,127})/progress")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_BATCH_PATH = "/v1/progress"
MAX_BATCH = 500  # as the batch route
# A report of every field at its longest is under 2.5 KB; larger bodies take the full route.
MAX_THIN_BODY = 4096
# A request's line and headers together (``ReportProtocol``): a JWT is a few KiB at most.
MAX_HEAD_BYTES = 64 * 1024
_PHASES = {p.value: p for p in WORKING_PHASES}
_FIELDS = frozenset(
    {"phase", "phase_progress", "step", "step_progress", "step_status", "steps_total", "message"}
)
_JSON_TYPE = b"application/json"

Reply = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
_RESULT = b'{"job_id":"%s","applied":%s,"seq":%d,"phase":"%s","progress":%s}'


class ThinCounts:
    """Requests answered on the thin path, by where (``protocol`` or ``asgi``): plain
    integers, read by the metrics registry only when scraped
    (``phasecast_thin_requests_total{transport}``)."""

    def __init__(self) -> None:
        self.answered = {"protocol": 0, "asgi": 0}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "phasecast_thin_requests", "Progress requests answered on the thin path, by where",
            labels=["transport"],
        )
        for transport, count in self.answered.items():
            family.add_metric([transport], count)
        yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


def thin_counts(services: Services) -> ThinCounts:
    """The counts of ``services``' app, registered with its metrics on first use."""
    counts: ThinCounts | None = getattr(services.metrics, "thin", None)
    if counts is None:
        counts = ThinCounts()
        services.metrics.registry.register(counts)
        services.metrics.thin = counts
    return counts


class Thin:
    """What both places share: which requests to take, the work, and the answers."""

    def __init__(self, services: Services, transport: str) -> None:
        self.answered = thin_counts(services).answered
        self.transport = transport
        self.services = services
        self.verifier = services.verifier
        self.tracker = services.tracker
        self.body_limit = min(MAX_THIN_BODY, services.settings.max_report_body_bytes)
        self.batch_limit = services.settings.max_batch_body_bytes
        self.timeout = services.settings.request_timeout

    def caller(self, headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None, str | None] | None:
        """``(known worker, Content-Length, client request id)`` if the request may take
        the thin path as far as its headers tell; None sends it the long way."""
        token = None
        json_body = False
        length = None
        request_id = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if token is not None or scheme.lower() != b"bearer" or not rest.strip():
                    return None  # two of them, or not a bearer token: the route says why
                token = rest.strip().decode("latin-1")
            elif name == b"content-type":
                json_body = value.split(b";", 1)[0].strip().lower() == _JSON_TYPE
            elif name == b"content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif name in (b"transfer-encoding", b"expect", b"origin"):
                # Chunked bodies and 100-continue are the guard's; CORS requests get their
                # headers from the CORS middleware.
                return None
            elif name == b"x-request-id" and request_id is None:
                request_id = sane_request_id(value)
        if token is None or not json_body:
            return None
        try:
            known = self.verifier.verify(token)
        except PhasecastError:
            return None
        if not known.is_worker or known.expired:
            return None
        return True, length, request_id

    async def report(self, job_id: str, update: ProgressUpdate) -> Reply:
        self.answered[self.transport] += 1
        try:
            decided = await self.tracker.update_json(job_id, update)
        except PhasecastError as exc:
            return self.refusal(exc, f"/v1/jobs/{job_id}/progress")
        body = b'{"applied":%s,"state":%s}' % (
            b"true" if decided.applied else b"false",
            decided.state_json.encode(),
        )
        return 200, [(b"content-type", _JSON_TYPE), (b"content-length", b"%d" % len(body))], body

    async def batch(self, reports: list[tuple[str, ProgressUpdate]]) -> Reply:
        """As the batch route answers: a result per report, in order; reports of one job
        apply in the order given."""
        self.answered[self.transport] += 1
        answers = await self.tracker.update_many_json(reports)
        # Encoded by hand, as json.dumps would (tested equal): job ids match _JOB_ID and
        # phases are enum names, so neither needs escaping; a float's JSON is its repr.
        results: list[bytes] = []
        for (job_id, _), answer in zip(reports, answers, strict=True):
            if isinstance(answer, PhasecastError):
                error = {"code": answer.code, "message": answer.message}
                if isinstance(answer, InvalidUpdate):
                    error["field"] = answer.field
                results.append(json.dumps({"job_id": job_id, "error": error}, separators=(",", ":"),
                                          ensure_ascii=False).encode())
                continue
            seq, phase, progress = answer.summary()
            results.append(_RESULT % (job_id.encode(), b"true" if answer.applied else b"false", seq,
                                      phase.encode(), float.__repr__(progress).encode()))
        body = b'{"results":[%s]}' % b",".join(results)
        return 200, [(b"content-type", _JSON_TYPE), (b"content-length", b"%d" % len(body))], body

    def refusal(self, exc: PhasecastError, path: str) -> Reply:
        """As ``deps.error_response`` answers (same status, body, log line and metric), for
        the errors a report can meet once its body was read."""
        status = STATUS_BY_ERROR.get(type(exc), 400)
        self.services.metrics.rejected_requests.labels(exc.code).inc()
        log.log(logging.ERROR if status >= 500 else logging.INFO, "request rejected: %s", exc.message,
                extra={"status": status, "code": exc.code, "path": path})
        response = JSONResponse(error_body(exc.code, exc.message, getattr(exc, "field", None)), status)
        return status, list(response.raw_headers), bytes(response.body)


def accessed(
    method: str, path: str, status: int, started: float, request_id: str, job_id: str | None
) -> None:
    """The access-log line ``RequestContextMiddleware`` writes (one level check when its
    level is off)."""
    level = _access_level(status)
    if access_log.isEnabledFor(level):
        access_log.log(level, "%s %s %d", method, path, status,
                       extra={"duration_ms": round((time.perf_counter() - started) * 1000, 2),
                              "request_id": request_id, "job_id": job_id})


Work = tuple[str, ProgressUpdate] | list[tuple[str, ProgressUpdate]]


def parse(thin: Thin, path: str, body: bytes) -> Work | None:
    """The report (job id and update) or the batch of a body already within its cap, if
    plainly valid; None for anything the full route must judge."""
    if path == _BATCH_PATH:
        return _batch(body)
    found = _PATH.fullmatch(path)
    if found is None:
        return None
    update = _update(body)
    return None if update is None else (found.group(1), update)


class ThinReports:
    """ASGI middleware: install it outermost (it gives the requests it answers their id and
    access-log line itself)."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.thin = Thin(services, "asgi")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path != _BATCH_PATH and _PATH.fullmatch(path) is None:
            await self.app(scope, receive, send)
            return
        thin = self.thin
        taken = thin.caller(scope["headers"])
        if taken is None:
            await self.app(scope, receive, send)
            return
        _, length, request_id = taken
        limit = thin.batch_limit if path == _BATCH_PATH else thin.body_limit
        if length is None or length > limit:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        read: list[Message] = []
        receive = timed(scope, receive, thin.timeout)  # the guard's deadline too, in scope
        try:
            body = await _small_body(receive, read, limit)
        except BodyTimedOut:
            status, headers, reply = thin.refusal(TimedOut(thin.timeout), path)
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": reply})
            accessed("POST", path, status, started, request_id or _next_request_id(), None)
            return
        work = None if body is None else parse(thin, path, body)
        if work is None:
            await self.app(scope, _replay(read, receive), send)
            return
        request_id = request_id or _next_request_id()
        request_id_var.set(request_id)  # this request's task: for the tracker's log lines
        if isinstance(work, list):
            job_id = None
            status, headers, reply = await thin.batch(work)
        else:
            job_id = work[0]
            job_id_var.set(job_id)
            status, headers, reply = await thin.report(*work)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"x-request-id", request_id.encode())]})
        await send({"type": "http.response.body", "body": reply})
        accessed("POST", path, status, started, request_id, job_id)


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
        # Decoded as the route decodes (UTF-8, nothing else): json.loads of bytes would also
        # take UTF-16/32 and a byte-order mark, which the route refuses.
        data = loads_untrusted(body.decode("utf-8"))  # a key twice: the route refuses it
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
        # Decoded as the route decodes (UTF-8, nothing else): json.loads of bytes would also
        # take UTF-16/32 and a byte-order mark, which the route refuses.
        data = loads_untrusted(body.decode("utf-8"))  # a key twice: the route refuses it
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


# --- the protocol path ------------------------------------------------------------------


class _Taken:
    """A request the protocol is reading for the thin path (headers seen, body coming)."""

    __slots__ = ("body", "limit", "path", "request_id", "started")

    def __init__(self, path: str, limit: int, request_id: str | None) -> None:
        self.path = path
        self.limit = limit
        self.request_id = request_id
        self.body = bytearray()
        self.started = time.perf_counter()


class _Unset:
    """``message_event`` of a thin cycle: uvicorn sets it when the connection is lost."""

    __slots__ = ()

    def set(self) -> None:
        pass


_UNSET_EVENT = _Unset()


class ThinCycle:
    """A thin request in uvicorn's place for one: what ``HttpToolsProtocol`` reads of its
    current cycle (``response_complete``, ``disconnected``, ``keep_alive``,
    ``message_event``), and ``run_asgi``, which its pipeline calls to start the next
    request; ``app`` is not used."""

    __slots__ = ("disconnected", "keep_alive", "message_event", "on_response", "protocol",
                 "response_complete", "taken", "work")

    def __init__(self, protocol: ReportProtocol, taken: _Taken, work: Work) -> None:
        self.protocol = protocol
        self.taken = taken
        self.work = work
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = True
        self.message_event = _UNSET_EVENT
        self.on_response = protocol.on_response_complete

    async def run_asgi(self, app: Any) -> None:
        protocol = self.protocol
        thin = protocol.thin
        taken = self.taken
        assert thin is not None
        request_id = taken.request_id or _next_request_id()
        request_id_var.set(request_id)  # this request's task: for the tracker's log lines
        work = self.work
        job_id = None
        try:
            if isinstance(work, list):
                status, headers, body = await thin.batch(work)
            else:
                job_id = work[0]
                job_id_var.set(job_id)
                status, headers, body = await thin.report(*work)
        except BaseException:
            # As uvicorn answers an app that failed before its response (a bug, not a refusal).
            log.exception("thin report failed")
            status, headers, body = 500, [(b"content-type", b"text/plain; charset=utf-8"),
                                          (b"connection", b"close")], b"Internal Server Error"
            headers.append((b"content-length", b"21"))
            self.keep_alive = False
        if self.disconnected:
            return
        flow = protocol.flow
        if flow.write_paused:
            await flow.drain()
            if self.disconnected:
                return
        transport = protocol.transport
        out = [STATUS_LINE[status]]
        for name, value in protocol.server_state.default_headers:
            out += (name, b": ", value, b"\r\n")
        for name, value in headers:
            out += (name, b": ", value, b"\r\n")
        out += (b"x-request-id: ", request_id.encode(), b"\r\n")
        if not self.keep_alive and status != 500:
            out.append(b"connection: close\r\n")
        out += (b"\r\n", body)
        transport.write(b"".join(out))
        self.response_complete = True
        if not self.keep_alive:
            transport.close()
        accessed("POST", taken.path, status, taken.started, request_id, job_id)
        self.on_response()


def _state_of(app: Any) -> Any | None:
    """The state of the Phasecast app inside uvicorn's wrappers (proxy headers, ...); None
    if the app is not Phasecast's."""
    for _ in range(8):
        state = getattr(app, "state", None)
        if state is not None and isinstance(getattr(state, "services", None), Services):
            return state
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def services_of(app: Any) -> Services | None:
    state = _state_of(app)
    return None if state is None else cast(Services, state.services)


def thin_of(app: Any) -> Thin | None:
    """The protocol path's ``Thin`` of the Phasecast app, made once per app; None if the app
    is not Phasecast's, or its settings keep reports on ASGI (``ingest_transport = "asgi"``)."""
    state = _state_of(app)
    if state is None:
        return None
    made: Thin | None = getattr(state, "thin_protocol", None)
    if made is None and state.services.settings.ingest_transport == "raw":
        made = state.thin_protocol = Thin(state.services, "protocol")
    return made


class _Sweep:
    """The request deadline of ``phasecast serve``'s connections, one per server: every
    eighth of the timeout (at most every second) it looks at each connection's
    ``reading_since`` (set while a request's headers, or a thin request's body, are being
    read) and times out those that are overdue. A request costs two attribute writes and a
    clock read, not a timer; the sweep runs only while the server has connections."""

    def __init__(self, connections: set[Any], timeout: float) -> None:
        self.connections = connections
        self.timeout = timeout
        self.interval = min(1.0, timeout / 8)
        self.loop = asyncio.get_running_loop()
        self.handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self.run)

    def run(self) -> None:
        self.handle = None
        overdue = self.loop.time() - self.timeout
        for connection in list(self.connections):
            since = getattr(connection, "reading_since", None)
            if since is not None and since <= overdue:
                connection.timed_out()
        if self.connections:
            self.start()


_SWEEPS: weakref.WeakKeyDictionary[Any, _Sweep] = weakref.WeakKeyDictionary()


class ReportProtocol(HttpProtocol):
    """uvicorn's httptools protocol (with the SSE seam) that answers progress reports on the
    thin path as the parser reads them, without building the ASGI request; see the module
    docstring. Everything else, and whatever the thin path does not take, is uvicorn's own
    request handling, with the body read so far handed to it."""

    thin: Thin | None = None
    _taken: _Taken | None = None
    # Loop time since which a request's headers (or a thin request's body) are being read,
    # or None: see ``_Sweep``. ``_begun``: a byte of a request has come on this connection.
    reading_since: float | None = None
    _begun = False
    _services: Services | None = None
    # Bytes come in since the current request's head began (None while a body is read):
    # the parser keeps a request's headers whatever their size, so they are bounded here.
    _head_bytes: int | None = 0
    _head_begun = False  # the current read began a request head

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.thin = thin_of(self.app)
        services = self._services = services_of(self.app)
        if services is not None:
            sweep = _SWEEPS.get(self.server_state)
            if sweep is None:
                sweep = _SWEEPS[self.server_state] = _Sweep(
                    self.connections, services.settings.request_timeout
                )
            sweep.start()
            self.reading_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        self._head_begun = False
        super().data_received(data)
        # Counted after parsing: a read that completes a head (what follows it is a body,
        # capped elsewhere) or begins one (part of it may be the request before) is not;
        # every other read while a head is incomplete is, so a head is refused within
        # MAX_HEAD_BYTES and one read of where it began.
        if self._head_bytes is not None and not self._head_begun:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def _refuse_head(self) -> None:
        """A request head over ``MAX_HEAD_BYTES``: 431, and the connection closes (what
        is left of the head is never read)."""
        self._head_bytes = None
        self.reading_since = None
        self._answer_and_close(431, "headers_too_large", f"the request's headers are over "
                               f"{MAX_HEAD_BYTES // 1024} KiB: send fewer or shorter headers")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refused, as JSON like every other error."""
        self._head_bytes = None
        self._answer_and_close(400, "bad_request", f"{msg.rstrip('.')}: the request is not "
                               "valid HTTP/1.1 (request line, headers or framing)")

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error body and ``Connection: close``, then close:
        for what is refused before a request reaches the application."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._services is not None:
            self._services.metrics.rejected_requests.labels(code).inc()
        log.info("request rejected: %s", message, extra={"status": status, "code": code, "path": None})
        response = JSONResponse(error_body(code, message), status, headers={"Connection": "close"})
        out = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *response.raw_headers]:
            out += (name, b": ", value, b"\r\n")
        out += (b"\r\n", bytes(response.body))
        transport.write(b"".join(out))
        transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_begun = True
        if self._services is not None:
            self._begun = True
            self.reading_since = self.loop.time()

    def timed_out(self) -> None:
        """The sweep found this connection's request overdue: answer 408 (close without an
        answer if no byte of a request came), unless a response to an earlier request is
        still on its way: then the connection closes after it."""
        self.reading_since = None
        self._taken = None
        transport = self.transport
        services = self._services
        if transport is None or transport.is_closing() or services is None:
            return
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            if cycle is not None:
                cycle.keep_alive = False
            return
        if self._begun:
            exc = TimedOut(services.settings.request_timeout)
            self._answer_and_close(408, exc.code, exc.message)
        transport.close()

    def on_headers_complete(self) -> None:
        self._head_bytes = None  # the body's size is the guard's (and the thin path's) to cap
        self.reading_since = None  # the body: the ASGI guard's deadline, or the thin one below
        self._taken = None
        thin = self.thin
        if thin is not None and self.limit_concurrency is None:
            url = self.url
            if url.startswith(b"/v1/") and self.parser.get_method() == b"POST":
                self._taken = self._take(thin, url)
                if self._taken is not None:
                    self.reading_since = self.loop.time()  # until the body is in
                    return
        super().on_headers_complete()

    def _take(self, thin: Thin, url: bytes) -> _Taken | None:
        if b"?" in url or b"%" in url or not url.isascii():
            return None
        path = url.decode("ascii")
        if path == _BATCH_PATH:
            limit = thin.batch_limit
        elif path.endswith("/progress") and _PATH.fullmatch(path):
            limit = thin.body_limit
        else:
            return None
        parser = self.parser
        if parser.get_http_version() != "1.1" or not parser.should_keep_alive() or parser.should_upgrade():
            return None
        taken = thin.caller(self.headers)
        if taken is None:
            return None
        _, length, request_id = taken
        if length is None or length > limit:
            return None
        return _Taken(path, limit, request_id)

    def on_body(self, body: bytes) -> None:
        taken = self._taken
        if taken is None:
            super().on_body(body)
            return
        taken.body += body  # at most Content-Length, which is within the cap

    def on_message_complete(self) -> None:
        taken = self._taken
        if taken is None:
            super().on_message_complete()
            return
        self._taken = None
        self.reading_since = None
        thin = self.thin
        assert thin is not None
        body = bytes(taken.body)
        work = parse(thin, taken.path, body)
        if work is None:
            # The long way, as if uvicorn had read it: the same request, its body complete.
            super().on_headers_complete()
            full = self.cycle
            full.body = bytearray(body)
            full.more_body = False
            full.message_event.set()
            return
        existing = self.cycle
        cycle: Any = ThinCycle(self, taken, work)
        self.cycle = cycle
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, self.app)
        else:
            # Pipelined behind a request still being answered: queued as uvicorn queues.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))
