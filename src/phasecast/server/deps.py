"""What every route needs: the running services, the caller's identity, and the mapping
from Phasecast errors to HTTP responses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from phasecast.config import Settings
from phasecast.errors import (
    EngineUnavailable,
    InvalidUpdate,
    JobExists,
    JobNotFound,
    JobTerminal,
    PhasecastError,
)
from phasecast.server.auth import Forbidden, Principal, TokenVerifier, Unauthorized
from phasecast.server.metrics import Metrics
from phasecast.tracker import ProgressTracker

log = logging.getLogger("phasecast.server")

STATUS_BY_ERROR: dict[type[PhasecastError], int] = {
    InvalidUpdate: 422,
    JobNotFound: 404,
    JobExists: 409,
    JobTerminal: 409,
    Unauthorized: 401,
    Forbidden: 403,
    EngineUnavailable: 503,
}


@dataclass(slots=True)
class Services:
    settings: Settings
    tracker: ProgressTracker
    verifier: TokenVerifier
    metrics: Metrics


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        return token.strip()
    return None


def authenticate(request: Request, *, allow_query: bool = False) -> Principal:
    token = bearer_token(request)
    if token is None and allow_query:
        token = request.query_params.get("access_token")
    if not token:
        where = "an Authorization: Bearer header" + (" or ?access_token=" if allow_query else "")
        raise Unauthorized(f"no token: send {where}")
    return services(request).verifier.verify(token)


async def principal(request: Request) -> Principal:
    """FastAPI dependency for REST routes (header only: query tokens end up in proxy logs)."""
    return authenticate(request)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return {"error": body}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PhasecastError)
    async def phasecast_error(request: Request, exc: PhasecastError) -> JSONResponse:
        status = STATUS_BY_ERROR.get(type(exc), 400)
        field = getattr(exc, "field", None)
        _count_rejection(request, exc.code)
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "request rejected: %s", exc.message,
                extra={"status": status, "code": exc.code, "path": request.url.path})
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(exc.code, exc.message, field), status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
        first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            _count_rejection(request, "invalid_json")
            log.info("request rejected: body is not JSON", extra={"path": request.url.path})
            return JSONResponse(
                error_body("invalid_json", "the request body is not valid JSON: "
                           + str(first.get("ctx", {}).get("error", first.get("msg")))),
                400,
            )
        location = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
        field = ".".join(location) or None
        detail = str(first.get("msg", "is invalid"))
        message = f"{field}: {detail}" if field else detail
        _count_rejection(request, "invalid")
        log.info("request rejected: %s", message, extra={"path": request.url.path})
        body = error_body("invalid", message, field)
        body["error"]["details"] = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg")}
            for e in errors
        ]
        return JSONResponse(body, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code)


def _count_rejection(request: Request, code: str) -> None:
    state = getattr(request.app.state, "services", None)
    if state is not None:
        state.metrics.rejected_requests.labels(code).inc()
