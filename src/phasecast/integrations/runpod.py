"""RunPod serverless: an async HTTP client, the shape of its answers, signed webhook URLs and
the translation of a worker's ``progress_update`` output into a percentage.

Only ``httpx`` is used (no ``runpod`` package). Everything here is transport and parsing;
what a status *means* for a Phasecast job lives in ``integrations.pipeline``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from phasecast.errors import InvalidUpdate, PhasecastError
from phasecast.model import (
    MAX_ERROR_CODE_CHARS,
    MAX_JSON_DEPTH,
    DuplicateKey,
    check_json,
    loads_untrusted,
    storable_text,
)

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
STATUSES = frozenset({IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT})
TERMINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})
# RunPod ids are short opaque strings ("c80ffee4-f315-4e25-a146-0f3d98cf024b-u1").
RUNPOD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

WEBHOOK_PATH = "/v1/integrations/runpod/webhook"


# --- errors --------------------------------------------------------------------------------


class RunPodError(PhasecastError):
    """RunPod answered with an error or could not be reached."""

    code = "runpod_error"

    def __init__(self, message: str, *, status: int | None = None, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.status = status
        # True when the request may have reached RunPod and taken effect although no answer
        # came back (a read timeout, a dropped connection): a /run may have started a job.
        self.maybe_applied = maybe_applied


class RunPodRateLimited(RunPodError):
    """429: back off for ``retry_after`` seconds (RunPod's header, or our own guess)."""

    code = "runpod_rate_limited"

    def __init__(self, retry_after: float | None) -> None:
        super().__init__("RunPod rate limit reached (429); backing off", status=429)
        self.retry_after = retry_after


class RunPodNotFound(RunPodError):
    """404 on a job: RunPod no longer has it (results expire) or it never existed."""

    code = "runpod_not_found"


class InvalidPayload(PhasecastError):
    """A status or webhook body that does not look like RunPod's."""

    code = "invalid"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field


# --- status payloads -----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RunPodStatus:
    """One answer of ``/status`` (webhooks carry the same fields)."""

    id: str
    status: str
    output: Any = None
    error: Any = None
    delay_time_ms: int | None = None
    execution_time_ms: int | None = None
    retries: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def parse(cls, payload: Any) -> RunPodStatus:
        """Validate a ``/status`` answer or webhook body; ``InvalidPayload`` names the problem."""
        if not isinstance(payload, dict):
            raise InvalidPayload("body", f"must be a JSON object, got {type(payload).__name__}")
        job_id = payload.get("id")
        if not isinstance(job_id, str) or not RUNPOD_ID_PATTERN.fullmatch(job_id):
            raise InvalidPayload(
                "id", "must be the RunPod job id (1-128 letters, digits, '.', '_', ':', '-')"
            )
        status = payload.get("status")
        if status not in STATUSES:
            raise InvalidPayload("status", f"must be one of {', '.join(sorted(STATUSES))}, got {status!r}")
        return cls(
            id=job_id,
            status=status,
            output=payload.get("output"),
            error=payload.get("error"),
            delay_time_ms=_optional_int(payload, "delayTime"),
            execution_time_ms=_optional_int(payload, "executionTime"),
            retries=_optional_int(payload, "retries"),
        )


def load_json(raw: bytes) -> Any:
    """Parse a RunPod body strictly, by the rules every Phasecast body follows
    (``model.check_json``: finite numbers, valid Unicode, at most ``MAX_JSON_DEPTH`` levels),
    so whatever is stored from it can be served again. Raises ``ValueError`` when it is not
    UTF-8 JSON, ``InvalidPayload`` (naming the field) when it is JSON we refuse (a key named
    twice in one object among it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = loads_untrusted(text)  # NaN and Infinity parse, and check_json refuses them
    except DuplicateKey as exc:
        raise InvalidPayload(exc.field, "appears more than once in one object") from None
    except RecursionError:
        raise InvalidPayload("body", f"nests deeper than {MAX_JSON_DEPTH} levels; flatten it") from None
    try:
        check_json(value, "", level=0)
    except InvalidUpdate as exc:
        raise InvalidPayload(exc.field, exc.problem) from None
    return value


def _optional_int(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidPayload(name, f"must be a non-negative number, got {value!r}")
    return int(value)


def output_progress(output: Any) -> float | None:
    """Percent (0-100) from whatever a RunPod worker passed to ``progress_update``.

    Understood: a number (0-1 is a fraction, above that a percent), ``"40%"``, ``"4/10"``,
    ``"0.4"``, and objects with ``progress``/``percent``/``percentage`` (same rule as
    numbers), or ``step``/``total`` (also ``current``/``steps``, ``done``/``total``).
    Anything else (a status message, say) is ``None``: it tells us nothing about how far
    the job got, and guessing would risk moving progress around.
    """
    if isinstance(output, bool) or output is None:
        return None
    if isinstance(output, int | float):
        return _fraction_or_percent(float(output))
    if isinstance(output, str):
        text = output.strip()
        if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text):
            return _clamp(float(match[1]))
        if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", text):
            return _ratio(float(match[1]), float(match[2]))
        try:
            return _fraction_or_percent(float(text))
        except ValueError:
            return None
    if isinstance(output, dict):
        for key in ("progress", "percent", "percentage"):
            if key in output:
                found = output_progress(output[key])
                if key != "progress" and isinstance(output[key], int | float) and output[key] <= 1:
                    # "percent": 1 means one percent, not all of it.
                    found = _clamp(float(output[key]))
                return found
        for done_key, total_key in (("step", "total"), ("current", "total"), ("done", "total"),
                                    ("step", "steps"), ("current", "steps")):
            done, total = output.get(done_key), output.get(total_key)
            if isinstance(done, int | float) and isinstance(total, int | float) and _is_number(done) \
                    and _is_number(total):
                return _ratio(float(done), float(total))
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fraction_or_percent(value: float) -> float | None:
    if not math.isfinite(value) or value < 0:
        return None
    return _clamp(value * 100.0 if value <= 1.0 else value)


def _ratio(done: float, total: float) -> float | None:
    if total <= 0 or done < 0 or not math.isfinite(done / total):
        return None
    return _clamp(100.0 * done / total)


def _clamp(value: float) -> float:
    return round(min(100.0, max(0.0, value)), 3)


# The longest RunPod error text kept: a panel's record keeps it whole; the job's own messages
# cut it further to fit their limits.
MAX_ERROR_TEXT = 1000


def decode_error(error: Any) -> tuple[str, str]:
    """``(code, message)`` from RunPod's ``error``: a plain string, or a string holding JSON
    (the Python SDK sends ``{"error_type", "error_message", "error_traceback", …}``). Both fit
    a job's state whatever RunPod sent: a code of at most 64 safe characters, and text with
    no NUL or lone surrogate, at most ``MAX_ERROR_TEXT`` characters."""
    if error is None or error == "":
        return "runpod_failed", "RunPod reported a failure without an error message"
    value = error
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return "runpod_failed", storable_text(value, MAX_ERROR_TEXT)
    if isinstance(value, dict):
        kind = value.get("error_type") or value.get("type") or "runpod_failed"
        message = value.get("error_message") or value.get("message") or value.get("error")
        text = str(message) if message is not None else json.dumps(value)
        code = re.sub(r"[^A-Za-z0-9_.:-]+", "_", str(kind)).strip("_")
        # "<class 'torch.cuda.OutOfMemoryError'>" → "torch.cuda.OutOfMemoryError"
        if code.startswith("class_"):
            code = code[len("class_"):]
        return code[:MAX_ERROR_CODE_CHARS] or "runpod_failed", storable_text(text, MAX_ERROR_TEXT)
    return "runpod_failed", storable_text(str(value), MAX_ERROR_TEXT)


# --- signed webhook URLs -------------------------------------------------------------------


def webhook_token(secret: str, job_id: str, step: str) -> str:
    """HMAC-SHA256 over the job id and step: only URLs we issued are accepted (RunPod does
    not sign its webhooks, so the URL itself is the credential)."""
    message = f"runpod-webhook\x1f{job_id}\x1f{step}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def webhook_url(public_url: str, secret: str, job_id: str, step: str, submission: str | None = None) -> str:
    """The URL RunPod calls when a job ends. ``submission`` names the submission (the
    idempotency key sent in the input), so a job whose ``/run`` answer was lost in a crash
    is recognised and adopted when its webhook arrives."""
    params = {"job": job_id, "step": step, "token": webhook_token(secret, job_id, step)}
    if submission is not None:
        params["submission"] = submission
    return f"{public_url.rstrip('/')}{WEBHOOK_PATH}?{urlencode(params)}"


def verify_webhook_token(secret: str, job_id: str, step: str, token: str) -> bool:
    # Bytes, not str: compare_digest refuses non-ASCII str, and a hostile token may be anything.
    expected = webhook_token(secret, job_id, step).encode()
    return hmac.compare_digest(expected, token.encode("utf-8", "surrogateescape"))


def derive_webhook_secret(jwt_secret: str | None) -> str | None:
    """A webhook secret derived from the JWT secret when none is configured: stable across
    restarts and shared by every instance that shares the JWT secret."""
    if not jwt_secret:
        return None
    return hmac.new(jwt_secret.encode(), b"phasecast-runpod-webhook", hashlib.sha256).hexdigest()


# --- the client ----------------------------------------------------------------------------


class RunPodClient:
    """``/run``, ``/status``, ``/cancel``, ``/retry``, ``/health`` of one serverless endpoint.

    A 429 raises ``RunPodRateLimited`` and also makes every later call of this client wait
    until the advertised time: the limit is per account, so one poll being told off means
    all of them should slow down.
    """

    def __init__(
        self,
        base_url: str,
        endpoint: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = "phasecast",
    ) -> None:
        if not endpoint:
            raise ValueError("a RunPod endpoint id is required (PHASECAST_RUNPOD_ENDPOINT)")
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint
        self._http = httpx.AsyncClient(
            base_url=f"{self.base_url}/{endpoint}",
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                     "User-Agent": user_agent},
            timeout=timeout,
            transport=transport,
        )
        self.blocked_until = 0.0  # monotonic time before which we do not call RunPod
        self.rate_limited = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    async def run(
        self, job_input: Any, webhook: str | None = None, *, ttl_seconds: float | None = None
    ) -> RunPodStatus:
        body: dict[str, Any] = {"input": job_input}
        if webhook:
            body["webhook"] = webhook
        if ttl_seconds is not None:
            # RunPod's execution policy: the job is dropped this long after submission.
            body["policy"] = {"ttl": int(ttl_seconds * 1000)}
        payload = await self._call("POST", "/run", body)
        if isinstance(payload, dict) and "status" not in payload:
            payload = {**payload, "status": IN_QUEUE}
        return RunPodStatus.parse(payload)

    async def status(self, runpod_id: str) -> RunPodStatus:
        return RunPodStatus.parse(await self._call("GET", f"/status/{runpod_id}"))

    async def cancel(self, runpod_id: str) -> None:
        await self._call("POST", f"/cancel/{runpod_id}")

    async def retry(self, runpod_id: str) -> RunPodStatus:
        payload = await self._call("POST", f"/retry/{runpod_id}")
        if isinstance(payload, dict) and "status" not in payload:
            payload = {**payload, "status": IN_QUEUE}
        if isinstance(payload, dict) and "id" not in payload:
            payload = {**payload, "id": runpod_id}
        return RunPodStatus.parse(payload)

    async def health(self) -> dict[str, Any]:
        payload = await self._call("GET", "/health")
        return payload if isinstance(payload, dict) else {}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        wait = self.blocked_until - time.monotonic()
        if wait > 0:
            raise RunPodRateLimited(wait)
        try:
            reply = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            # Refused or never connected: RunPod saw nothing. Anything else (a timeout while
            # waiting for the answer, a dropped connection) may have been acted upon.
            unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            raise RunPodError(f"cannot reach RunPod at {self.base_url}: {exc!r}",
                              maybe_applied=not unsent) from exc
        if reply.status_code == 429:
            retry_after = _retry_after(reply.headers.get("retry-after"))
            self.rate_limited += 1
            self.blocked_until = time.monotonic() + (retry_after or 1.0)
            raise RunPodRateLimited(retry_after)
        if reply.status_code == 404:
            raise RunPodNotFound(
                f"RunPod has no {path} (the job expired or was deleted)", status=404
            )
        if reply.status_code in (401, 403):
            raise RunPodError(
                "RunPod refused the API key; check PHASECAST_RUNPOD_API_KEY", status=reply.status_code
            )
        if reply.status_code >= 400:
            raise RunPodError(
                f"RunPod answered {method} {path} with {reply.status_code}: {reply.text[:200]}",
                status=reply.status_code,
            )
        try:
            return load_json(reply.content)
        except InvalidPayload as exc:
            raise RunPodError(f"RunPod answered {method} {path} with unusable JSON: {exc.message}") from exc
        except ValueError as exc:
            raise RunPodError(f"RunPod answered {method} {path} with non-JSON: {reply.text[:200]}") from exc


def _retry_after(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        return max(0.0, min(float(header), 300.0))
    except ValueError:
        return None
