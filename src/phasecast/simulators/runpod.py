"""A local RunPod serverless endpoint, for tests and the demo.

A real HTTP server (Starlette on uvicorn, in a thread of its own) that follows RunPod's
documented API: ``POST /v2/{endpoint}/run`` and ``/runsync``, ``GET /status/{id}``,
``POST /cancel/{id}`` and ``/retry/{id}``, ``GET /health``, Bearer auth. A job waits in
``IN_QUEUE``, then reports ``progress_update`` outputs while ``IN_PROGRESS`` (in the shapes
real workers use), then ends; when it ends, the simulator POSTs the status JSON (plus
``input`` and ``webhook``) to the job's webhook, and retries a delivery that did not get a
200 up to two more times, ``webhook_retry_delay`` apart (10 s, like RunPod, unless changed).

Faults are switched on through ``RunPodSimulator.faults`` (for every job) or per job through
``input["sim"]``: drop the webhook, send it twice, send it late, send a stale status after the
final one (out of order), answer 429 or 500, end FAILED with a JSON-encoded error, TIMED_OUT,
or COMPLETED without output.

    with RunPodSimulator(step_delay=0.05) as sim:
        client = RunPodClient(sim.base_url, sim.endpoint, sim.api_key)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


OUTCOMES = ("COMPLETED", "FAILED", "TIMED_OUT", "NO_OUTPUT")
PROGRESS_SHAPES = ("fraction", "ratio_text", "step_total", "percent")


@dataclass
class Faults:
    """Switches that apply to every job (``input["sim"]`` overrides them per job)."""

    drop_webhook: bool = False  # never deliver the completion webhook
    duplicate_webhook: int = 0  # deliver each webhook this many extra times
    webhook_delay: float = 0.0  # seconds before the first delivery
    webhook_retry_delay: float = 10.0  # RunPod waits 10 s between attempts
    webhook_attempts: int = 3  # one delivery plus two retries
    stale_webhook: bool = False  # after the final webhook, also send an older IN_PROGRESS one
    rate_limit_next: int = 0  # the next N API requests answer 429
    rate_limit_until: float = 0.0  # time.monotonic() until which every API request answers 429
    retry_after: float | None = 0.2  # Retry-After header of the 429s (None: no header)
    error_next: int = 0  # the next N API requests answer 500
    not_found_next: int = 0  # the next N /status requests answer 404 (a passing fault)
    hold_run_answers: bool = False  # /run starts the job but answers only after release_runs()
    outcome: str = "COMPLETED"  # COMPLETED, FAILED, TIMED_OUT or NO_OUTPUT
    error_message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"
    error_type: str = "<class 'torch.cuda.OutOfMemoryError'>"  # as RunPod's Python SDK names it

    def storm(self, seconds: float) -> None:
        """A 429 storm: every API call is rate limited for ``seconds``."""
        self.rate_limit_until = time.monotonic() + seconds


@dataclass
class SimJob:
    id: str
    input: Any
    webhook: str | None
    status: str = "IN_QUEUE"
    output: Any = None
    error: str | None = None
    retries: int = 0
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    shape: str = "fraction"
    task: asyncio.Task[None] | None = None
    ttl: float | None = None  # seconds, from the execution policy

    def status_json(self) -> dict[str, Any]:
        now = time.monotonic()
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "delayTime": int(1000 * ((self.started or now) - self.created)),
            "retries": self.retries,
        }
        if self.started is not None:
            body["executionTime"] = int(1000 * ((self.finished or now) - self.started))
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


@dataclass(slots=True, frozen=True)
class Delivery:
    job_id: str
    status: str
    http_status: int | None  # None: connection failed
    attempt: int
    duplicate: bool = False


class RunPodSimulator:
    def __init__(
        self,
        *,
        endpoint: str = "sim-endpoint",
        api_key: str = "sim-api-key",
        port: int | None = None,
        queue_delay: float = 0.05,
        step_delay: float = 0.05,
        steps: int = 5,
        faults: Faults | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.api_key = api_key
        self.port = port or free_port()
        self.queue_delay = queue_delay
        self.step_delay = step_delay
        self.steps = steps
        self.faults = faults or Faults()
        self.jobs: dict[str, SimJob] = {}
        self.deliveries: list[Delivery] = []
        self.requests: Counter[str] = Counter()  # "POST /run" → count, "429", "500" too
        self.cancelled: list[str] = []
        self.pollers: dict[str, set[str]] = {}  # RunPod job id → User-Agents that polled it
        self._runs_by_input: Counter[str] = Counter()
        self._shape = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._webhooks: httpx.AsyncClient | None = None
        self._lock = threading.Lock()
        self._held: asyncio.Event | None = None
        self._paused: asyncio.Event | None = None
        self.held_runs = 0  # /run requests started but not yet answered (hold_run_answers)

    @property
    def base_url(self) -> str:
        """The value for ``PHASECAST_RUNPOD_BASE_URL``."""
        return f"http://127.0.0.1:{self.port}/v2"

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> RunPodSimulator:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_config=None,
                                log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="runpod-sim", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the RunPod simulator did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> RunPodSimulator:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        self._held = asyncio.Event()
        self._paused = asyncio.Event()
        self._webhooks = httpx.AsyncClient(timeout=5.0)
        try:
            yield
        finally:
            tasks = [job.task for job in self.jobs.values() if job.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._webhooks.aclose()

    # --- test helpers --------------------------------------------------------------------

    def expire(self, runpod_id: str) -> None:
        """Forget a job, as RunPod does once results expire: /status answers 404."""
        with self._lock:
            self.jobs.pop(runpod_id, None)

    def webhooks_for(self, runpod_id: str) -> list[Delivery]:
        return [d for d in list(self.deliveries) if d.job_id == runpod_id]

    def count(self, status: str) -> int:
        return sum(1 for job in list(self.jobs.values()) if job.status == status)

    def running(self) -> list[str]:
        """Ids of the jobs RunPod would be billing for now (queued or in progress)."""
        return [job.id for job in list(self.jobs.values()) if job.status in ("IN_QUEUE", "IN_PROGRESS")]

    def resume(self) -> None:
        """Let every job held at its ``hold_at`` step go on."""
        loop, paused = self._loop, self._paused
        if loop is not None and paused is not None:
            loop.call_soon_threadsafe(paused.set)

    def release_runs(self) -> None:
        """Answer the /run requests held by ``faults.hold_run_answers`` (and stop holding)."""
        self.faults.hold_run_answers = False
        loop, held = self._loop, self._held
        if loop is not None and held is not None:
            loop.call_soon_threadsafe(held.set)

    # --- the HTTP API --------------------------------------------------------------------

    def _app(self) -> Starlette:
        prefix = f"/v2/{self.endpoint}"
        return Starlette(
            routes=[
                Route(f"{prefix}/run", self._run, methods=["POST"]),
                Route(f"{prefix}/runsync", self._runsync, methods=["POST"]),
                Route(f"{prefix}/status/{{job_id}}", self._status, methods=["GET", "POST"]),
                Route(f"{prefix}/cancel/{{job_id}}", self._cancel, methods=["POST"]),
                Route(f"{prefix}/retry/{{job_id}}", self._retry, methods=["POST"]),
                Route(f"{prefix}/health", self._health, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    def _gate(self, request: Request, name: str) -> JSONResponse | None:
        """Auth and the rate-limit/500 faults, in RunPod's order (auth first)."""
        self.requests[name] += 1
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            self.requests["401"] += 1
            return JSONResponse({"error": "Unauthorized"}, 401)
        faults = self.faults
        if faults.rate_limit_next > 0 or time.monotonic() < faults.rate_limit_until:
            faults.rate_limit_next = max(0, faults.rate_limit_next - 1)
            self.requests["429"] += 1
            headers = {} if faults.retry_after is None else {"Retry-After": f"{faults.retry_after:g}"}
            return JSONResponse({"error": "Too Many Requests"}, 429, headers=headers)
        if faults.error_next > 0:
            faults.error_next -= 1
            self.requests["500"] += 1
            return JSONResponse({"error": "Internal Server Error"}, 500)
        return None

    async def _body(self, request: Request) -> tuple[dict[str, Any] | None, JSONResponse | None]:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return None, JSONResponse({"error": "body is not JSON"}, 400)
        if not isinstance(body, dict) or "input" not in body:
            return None, JSONResponse({"error": "body must be an object with an 'input'"}, 400)
        webhook = body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            return None, JSONResponse({"error": "webhook must be a URL"}, 400)
        policy = body.get("policy")
        limits = ("ttl", "executionTimeout")
        if policy is not None and (not isinstance(policy, dict) or not all(
                isinstance(policy.get(k, 0), int) and policy.get(k, 0) >= 0 for k in limits)):
            return None, JSONResponse({"error": "policy must be an object of millisecond counts"}, 400)
        return body, None

    def _new_job(self, body: dict[str, Any]) -> SimJob:
        ttl = (body.get("policy") or {}).get("ttl")
        job = SimJob(id=f"{uuid.uuid4()}-u1", input=body["input"], webhook=body.get("webhook"),
                     shape=PROGRESS_SHAPES[self._shape % len(PROGRESS_SHAPES)],
                     ttl=None if ttl is None else ttl / 1000)
        self._shape += 1
        with self._lock:
            self.jobs[job.id] = job
        job.task = asyncio.create_task(self._execute(job))
        return job

    async def _run(self, request: Request) -> JSONResponse:
        if (refused := self._gate(request, "POST /run")) is not None:
            return refused
        body, bad = await self._body(request)
        if bad is not None or body is None:
            return bad or JSONResponse({}, 400)
        job = self._new_job(body)
        if self.faults.hold_run_answers and self._held is not None:
            # The job runs; only the answer waits (a client that dies now never learns its id).
            self.held_runs += 1
            try:
                await self._held.wait()
            finally:
                self.held_runs -= 1
        return JSONResponse({"id": job.id, "status": job.status})

    async def _runsync(self, request: Request) -> JSONResponse:
        if (refused := self._gate(request, "POST /runsync")) is not None:
            return refused
        body, bad = await self._body(request)
        if bad is not None or body is None:
            return bad or JSONResponse({}, 400)
        job = self._new_job(body)
        assert job.task is not None
        # Like RunPod, answer with whatever the status is once the wait is over.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(job.task), 90)
        return JSONResponse(job.status_json())

    def _find(self, request: Request) -> SimJob | None:
        return self.jobs.get(str(request.path_params["job_id"]))

    async def _status(self, request: Request) -> JSONResponse:
        if (refused := self._gate(request, "GET /status")) is not None:
            return refused
        job = self._find(request)
        if self.faults.not_found_next > 0:
            self.faults.not_found_next -= 1
            job = None
        if job is None:
            self.requests["404"] += 1
            return JSONResponse({"error": "request does not exist"}, 404)
        self.pollers.setdefault(job.id, set()).add(request.headers.get("user-agent", ""))
        return JSONResponse(job.status_json())

    async def _cancel(self, request: Request) -> JSONResponse:
        if (refused := self._gate(request, "POST /cancel")) is not None:
            return refused
        job = self._find(request)
        if job is None:
            return JSONResponse({"error": "request does not exist"}, 404)
        if job.status in ("IN_QUEUE", "IN_PROGRESS"):
            self.cancelled.append(job.id)
            if job.task is not None:
                job.task.cancel()
            self._finish(job, "CANCELLED")
        return JSONResponse({"id": job.id, "status": job.status})

    async def _retry(self, request: Request) -> JSONResponse:
        if (refused := self._gate(request, "POST /retry")) is not None:
            return refused
        job = self._find(request)
        if job is None:
            return JSONResponse({"error": "request does not exist"}, 404)
        if job.status not in ("FAILED", "TIMED_OUT"):
            return JSONResponse({"error": f"only FAILED or TIMED_OUT jobs can be retried, not {job.status}"},
                                400)
        job.retries += 1
        job.status, job.output, job.error = "IN_QUEUE", None, None
        job.started = job.finished = None
        job.task = asyncio.create_task(self._execute(job))
        return JSONResponse({"id": job.id, "status": job.status})

    async def _health(self, request: Request) -> JSONResponse:
        if (refused := self._gate(request, "GET /health")) is not None:
            return refused
        counts = Counter(job.status for job in self.jobs.values())
        return JSONResponse({
            "jobs": {"completed": counts["COMPLETED"], "failed": counts["FAILED"],
                     "inProgress": counts["IN_PROGRESS"], "inQueue": counts["IN_QUEUE"],
                     "retried": sum(job.retries for job in self.jobs.values())},
            "workers": {"idle": 1, "running": counts["IN_PROGRESS"]},
        })

    # --- a job's life --------------------------------------------------------------------

    def _options(self, job: SimJob) -> dict[str, Any]:
        sim = job.input.get("sim") if isinstance(job.input, dict) else None
        return sim if isinstance(sim, dict) else {}

    async def _execute(self, job: SimJob) -> None:
        if job.ttl is None:
            await self._work(job)
            return
        try:
            await asyncio.wait_for(self._work(job), job.ttl)
        except TimeoutError:
            # The execution policy's ttl: RunPod drops the job.
            job.output = None
            self._finish(job, "TIMED_OUT")

    async def _work(self, job: SimJob) -> None:
        options = self._options(job)
        # The same input is the same panel, whatever idempotency key its client added.
        plain = {k: v for k, v in job.input.items() if "idempotency" not in k} if isinstance(
            job.input, dict) else job.input
        key = json.dumps(plain, sort_keys=True)
        self._runs_by_input[key] += 1
        run_number = self._runs_by_input[key]
        steps = int(options.get("steps", self.steps))
        step_delay = float(options.get("step_delay", self.step_delay))
        await asyncio.sleep(float(options.get("queue_delay", self.queue_delay)))
        job.status, job.started = "IN_PROGRESS", time.monotonic()
        hold_at = options.get("hold_at")
        for done in range(1, steps + 1):
            await asyncio.sleep(step_delay)
            if done < steps:
                job.output = _progress_output(job.shape, done, steps)
            if done == hold_at and self._paused is not None:
                await self._paused.wait()  # stays IN_PROGRESS at this output until resume()
        outcome = str(options.get("outcome", self.faults.outcome))
        fail_runs = int(options.get("fail_runs", 0))  # the first N runs of this input fail
        if fail_runs and run_number > fail_runs:
            outcome = "COMPLETED"
        elif fail_runs:
            outcome = str(options.get("outcome", "FAILED"))
        if outcome == "COMPLETED":
            job.output = {"image_url": f"https://images.example/{job.id}.png", "seed": run_number}
            self._finish(job, "COMPLETED")
        elif outcome == "NO_OUTPUT":
            job.output = None
            self._finish(job, "COMPLETED")
        elif outcome == "TIMED_OUT":
            job.output = None
            self._finish(job, "TIMED_OUT")
        else:
            job.output = None
            job.error = json.dumps({
                "error_type": str(options.get("error_type", self.faults.error_type)),
                "error_message": str(options.get("error_message", self.faults.error_message)),
                "error_traceback": "Traceback (most recent call last):\n  ...",
                "hostname": "sim-worker-1",
            })
            self._finish(job, "FAILED")

    def _finish(self, job: SimJob, status: str) -> None:
        job.status, job.finished = status, time.monotonic()
        if job.webhook and not self._options(job).get("drop_webhook", self.faults.drop_webhook):
            payload = {**job.status_json(), "input": job.input, "webhook": job.webhook}
            stale = {"id": job.id, "status": "IN_PROGRESS", "output": _progress_output(job.shape, 1, 5),
                     "input": job.input, "webhook": job.webhook}
            asyncio.get_running_loop().create_task(self._deliver(job, payload, stale))

    async def _deliver(self, job: SimJob, payload: dict[str, Any], stale: dict[str, Any]) -> None:
        options, faults = self._options(job), self.faults
        await asyncio.sleep(float(options.get("webhook_delay", faults.webhook_delay)))
        delivered = await self._post(job, payload, faults.webhook_attempts, duplicate=False)
        for _ in range(int(options.get("duplicate_webhook", faults.duplicate_webhook))):
            await asyncio.sleep(0.01)
            await self._post(job, payload, 1, duplicate=True)
        if delivered and options.get("stale_webhook", faults.stale_webhook):
            await self._post(job, stale, 1, duplicate=True)

    async def _post(self, job: SimJob, payload: dict[str, Any], attempts: int, *, duplicate: bool) -> bool:
        assert self._webhooks is not None
        assert job.webhook is not None
        for attempt in range(1, attempts + 1):
            status: int | None
            try:
                reply = await self._webhooks.post(job.webhook, json=payload)
                status = reply.status_code
            except httpx.HTTPError:
                status = None
            self.deliveries.append(Delivery(job.id, str(payload["status"]), status, attempt, duplicate))
            if status == 200:
                return True
            if attempt < attempts:
                await asyncio.sleep(self.faults.webhook_retry_delay)
        return False


def _progress_output(shape: str, done: int, total: int) -> Any:
    """The shapes real workers pass to ``runpod.serverless.progress_update``."""
    if shape == "fraction":
        return {"progress": round(done / total, 3)}
    if shape == "ratio_text":
        return f"{done}/{total}"
    if shape == "step_total":
        return {"step": done, "total": total}
    return {"percent": round(100 * done / total, 1)}
