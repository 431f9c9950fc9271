"""Worker SDK: report a generation's progress in a few lines, in-process or over HTTP.

    from phasecast.worker import remote_worker

    async with remote_worker("https://progress.example", token) as worker:
        async with worker.job(job_id) as job:
            async with job.phase("ANALYZING") as phase:
                await phase.update(40, "Reading the story")
            async with job.phase("GENERATING", steps_total=6) as phase:
                await phase.step("panel-1", 50)
            ...
    # leaving the job block completes the job; an exception inside fails it with the error

``local_worker(tracker)`` gives the same API on a ``ProgressTracker`` in this process.
Leaving a phase block finishes that phase (progress 100 unless it has steps, which finish on
their own); the next phase block moves the job on. Late or duplicate reports are harmless:
the server ignores anything that would move progress backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any, Protocol

import httpx

from phasecast.backoff import backoff_delay
from phasecast.errors import EngineUnavailable, InvalidUpdate, JobNotFound, JobTerminal, PhasecastError
from phasecast.model import (
    MAX_ERROR_CODE_CHARS,
    MAX_ERROR_MESSAGE_CHARS,
    JobState,
    Phase,
    ProgressUpdate,
    StepStatus,
    storable_text,
    validate_job_id,
    validate_metadata,
    validate_update,
)
from phasecast.tracker import ProgressTracker

log = logging.getLogger("phasecast.worker")

REMOTE_ATTEMPTS = 5
REMOTE_BACKOFF_SECONDS = 0.2
REMOTE_BACKOFF_CAP_SECONDS = 5.0


class WorkerError(PhasecastError):
    """The server refused a report for a reason retrying will not fix (bad token, forbidden)."""

    code = "worker_error"


class Backend(Protocol):
    async def create(self, kind: str, owner: str | None, job_id: str | None,
                     metadata: dict[str, Any]) -> JobState: ...

    async def get(self, job_id: str) -> JobState: ...

    async def update(self, job_id: str, update: ProgressUpdate) -> JobState: ...

    async def complete(self, job_id: str, message: str | None) -> JobState: ...

    async def fail(self, job_id: str, code: str, message: str) -> JobState: ...

    async def aclose(self) -> None: ...


class LocalBackend:
    """Straight onto a ``ProgressTracker`` (the generation code runs inside the server, or
    shares its engine)."""

    def __init__(self, tracker: ProgressTracker) -> None:
        self.tracker = tracker

    async def create(self, kind: str, owner: str | None, job_id: str | None,
                     metadata: dict[str, Any]) -> JobState:
        if owner is None:
            raise InvalidUpdate("owner", "is required when creating a job in-process")
        return await self.tracker.create(kind, owner=owner, job_id=job_id, metadata=metadata)

    async def get(self, job_id: str) -> JobState:
        return await self.tracker.get(job_id)

    async def update(self, job_id: str, update: ProgressUpdate) -> JobState:
        return (await self.tracker.update(job_id, update)).state

    async def complete(self, job_id: str, message: str | None) -> JobState:
        return (await self.tracker.complete(job_id, message)).state

    async def fail(self, job_id: str, code: str, message: str) -> JobState:
        return (await self.tracker.fail(job_id, code, message)).state

    async def aclose(self) -> None:
        return None


class RemoteBackend:
    """The REST API with a worker token (scope ``jobs:write``). Connection errors and 503s
    are retried with backoff; refusals raise at once with the server's reason."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                       headers={"Authorization": f"Bearer {token}"})

    async def create(self, kind: str, owner: str | None, job_id: str | None,
                     metadata: dict[str, Any]) -> JobState:
        # The same rules the server applies, checked here so a mistake raises at once with
        # the same message instead of after a round trip (and ids never build a wrong URL).
        if job_id is not None:
            validate_job_id(job_id)
        validate_metadata(metadata)
        body: dict[str, Any] = {"kind": kind, "metadata": metadata}
        if owner is not None:
            body["owner"] = owner
        if job_id is not None:
            body["job_id"] = job_id
        return JobState.from_dict(await self._call("POST", "/v1/jobs", body, job_id))

    async def get(self, job_id: str) -> JobState:
        return JobState.from_dict(await self._call("GET", f"/v1/jobs/{job_id}", None, job_id))

    async def update(self, job_id: str, update: ProgressUpdate) -> JobState:
        validate_update(update)
        body: dict[str, Any] = {"phase": update.phase.value}
        for name in ("phase_progress", "step", "step_progress", "step_status", "steps_total", "message"):
            value = getattr(update, name)
            if value is not None:
                body[name] = value
        reply = await self._call("POST", f"/v1/jobs/{job_id}/progress", body, job_id)
        return JobState.from_dict(reply["state"])

    async def complete(self, job_id: str, message: str | None) -> JobState:
        body = {} if message is None else {"message": message}
        reply = await self._call("POST", f"/v1/jobs/{job_id}/complete", body, job_id)
        return JobState.from_dict(reply["state"])

    async def fail(self, job_id: str, code: str, message: str) -> JobState:
        body = {"error": {"code": code[:64] or "error", "message": message[:2000] or code}}
        reply = await self._call("POST", f"/v1/jobs/{job_id}/fail", body, job_id)
        return JobState.from_dict(reply["state"])

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any, job_id: str | None) -> dict[str, Any]:
        for attempt in range(1, REMOTE_ATTEMPTS + 1):
            try:
                reply = await self._http.request(method, path, json=body)
            except httpx.HTTPError as exc:
                problem = f"cannot reach Phasecast at {self._http.base_url}: {exc!r}"
            else:
                if reply.status_code < 400:
                    found: dict[str, Any] = reply.json()
                    return found
                error = _error_of(reply)
                if reply.status_code == 409 and error.get("code") == "terminal" and job_id:
                    state = await self.get(job_id)
                    raise JobTerminal(job_id, state.phase)
                if reply.status_code == 404 and job_id:
                    raise JobNotFound(job_id)
                if reply.status_code == 422:
                    raise InvalidUpdate(str(error.get("field") or "request"), str(error.get("message")))
                if reply.status_code not in (429, 502, 503, 504):
                    raise WorkerError(f"{method} {path} answered {reply.status_code}: "
                                      f"{error.get('message', reply.text[:200])}")
                problem = f"{method} {path} answered {reply.status_code}"
            if attempt == REMOTE_ATTEMPTS:
                raise EngineUnavailable(f"{problem}; gave up after {REMOTE_ATTEMPTS} attempts")
            await asyncio.sleep(
                backoff_delay(attempt, base=REMOTE_BACKOFF_SECONDS, cap=REMOTE_BACKOFF_CAP_SECONDS)
            )
        raise AssertionError("unreachable")


def _error_of(reply: httpx.Response) -> dict[str, Any]:
    try:
        error = reply.json().get("error")
    except ValueError:
        return {}
    return error if isinstance(error, dict) else {}


class Worker:
    """Entry point of the SDK: create jobs and report on them."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def create(self, kind: str = "comic", *, owner: str | None = None, job_id: str | None = None,
                     metadata: dict[str, Any] | None = None) -> JobState:
        return await self.backend.create(kind, owner, job_id, metadata or {})

    def job(self, job_id: str, *, complete_on_exit: bool = True) -> Job:
        return Job(self.backend, validate_job_id(job_id), complete_on_exit=complete_on_exit)

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def local_worker(tracker: ProgressTracker) -> Worker:
    return Worker(LocalBackend(tracker))


def remote_worker(base_url: str, token: str, *, timeout: float = 10.0) -> Worker:
    return Worker(RemoteBackend(base_url, token, timeout=timeout))


class Job:
    """``async with worker.job(job_id) as job:`` — an exception inside fails the job with the
    error (and propagates); leaving normally completes it (unless ``complete_on_exit=False``,
    for a job something else finishes, such as panels on RunPod)."""

    def __init__(self, backend: Backend, job_id: str, *, complete_on_exit: bool = True) -> None:
        self.backend = backend
        self.job_id = job_id
        self.complete_on_exit = complete_on_exit
        self.state: JobState | None = None

    async def __aenter__(self) -> Job:
        self.state = await self.backend.get(self.job_id)
        if self.state.terminal:
            raise JobTerminal(self.job_id, self.state.phase)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            if self.complete_on_exit:
                with contextlib.suppress(JobTerminal):
                    self.state = await self.backend.complete(self.job_id, None)
            return
        if isinstance(exc, JobTerminal):
            return  # ended elsewhere (cancelled by the user): nothing to report
        code, message = error_of(exc)
        try:
            self.state = await self.backend.fail(self.job_id, code, message)
        except JobTerminal:
            pass
        except Exception:
            log.exception("could not mark job %s failed", self.job_id)

    def phase(self, phase: Phase | str, *, steps_total: int | None = None,
              message: str | None = None) -> PhaseBlock:
        return PhaseBlock(self, Phase(phase), steps_total, message)

    async def update(self, update: ProgressUpdate) -> JobState:
        self.state = await self.backend.update(self.job_id, update)
        return self.state

    async def complete(self, message: str | None = None) -> JobState:
        self.state = await self.backend.complete(self.job_id, message)
        return self.state

    async def fail(self, code: str, message: str) -> JobState:
        self.state = await self.backend.fail(self.job_id, code, message)
        return self.state


class PhaseBlock:
    """``async with job.phase("GENERATING", steps_total=6) as phase:``; entering reports the
    phase, leaving finishes it."""

    def __init__(self, job: Job, phase: Phase, steps_total: int | None, message: str | None) -> None:
        if phase.terminal:
            raise InvalidUpdate("phase", f"{phase.value} is terminal; leave the job block to end the job")
        self.job = job
        self.phase = phase
        self.steps_total = steps_total
        self.message = message
        self._has_steps = steps_total is not None

    async def __aenter__(self) -> PhaseBlock:
        await self.job.update(ProgressUpdate(self.phase, steps_total=self.steps_total, message=self.message))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None and not self._has_steps:
            await self.job.update(ProgressUpdate(self.phase, phase_progress=100.0))

    async def update(self, percent: float, message: str | None = None) -> JobState:
        """Progress within this phase, 0-100 (never lower than reported before)."""
        return await self.job.update(
            ProgressUpdate(self.phase, phase_progress=percent, message=message)
        )

    async def step(self, step: str, percent: float | None = None, *, status: StepStatus | None = None,
                   message: str | None = None) -> JobState:
        """Progress of one sub-task (a panel); the phase shows the mean of its steps."""
        self._has_steps = True
        return await self.job.update(ProgressUpdate(
            self.phase, step=step, step_progress=percent,
            step_status=status, steps_total=self.steps_total, message=message,
        ))


def error_of(exc: BaseException) -> tuple[str, str]:
    """``(code, message)`` for an exception that ends a job."""
    if isinstance(exc, asyncio.CancelledError):
        return "worker_interrupted", "the worker was stopped before the job finished"
    code = getattr(exc, "code", None)
    if not isinstance(code, str) or not code:
        code = type(exc).__name__
    message = str(exc) or type(exc).__name__
    # Any exception's text, whatever it holds, must be a failure the job can keep: one that
    # cannot be written leaves the job running for ever.
    return storable_text(code, MAX_ERROR_CODE_CHARS), storable_text(message, MAX_ERROR_MESSAGE_CHARS)

