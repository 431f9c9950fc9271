"""What every route needs: the running services, the caller's identity, and the mapping
from Phasecast errors to HTTP responses."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from phasecast.config import Settings
from phasecast.errors import (
    EngineUnavailable,
    InvalidJSON,
    InvalidUpdate,
    JobExists,
    JobNotFound,
    JobTerminal,
    PhasecastError,
    UnsupportedMediaType,
)
from phasecast.server.auth import Forbidden, Principal, TokenVerifier, Unauthorized
from phasecast.server.guard import PRINCIPAL_STATE_KEY, TimedOut, TooLarge, body_pending
from phasecast.server.head import serves_head
from phasecast.server.metrics import Metrics
from phasecast.tracker import ProgressTracker

log = logging.getLogger("phasecast.server")

STATUS_BY_ERROR: dict[type[PhasecastError], int] = {
    InvalidJSON: 400,
    InvalidUpdate: 422,
    JobNotFound: 404,
    JobExists: 409,
    JobTerminal: 409,
    Unauthorized: 401,
    Forbidden: 403,
    TimedOut: 408,
    TooLarge: 413,
    UnsupportedMediaType: 415,
    EngineUnavailable: 503,
}

# The code of an error the framework raises (routing, body framing) by its status.
CODE_BY_STATUS: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
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


class RepeatedToken:
    """A URL that carries ``access_token`` more than once (``query_token``): refused, as
    a request with two Authorization headers is, since which one counts would depend on
    who reads it (a proxy may check the first, the server use the last)."""

    message = "the URL carries access_token more than once: send it once"


REPEATED_TOKEN = RepeatedToken()


def query_token(values: list[str]) -> str | RepeatedToken | None:
    """The ``access_token`` of a URL from all its values (in order): one, none, or
    ``REPEATED_TOKEN``."""
    if not values:
        return None
    return values[0] if len(values) == 1 else REPEATED_TOKEN


def bearer_token(request: Request) -> str | None:
    headers = request.headers.getlist("authorization")
    if len(headers) > 1:
        raise Unauthorized(
            f"the request carries {len(headers)} Authorization headers: send one"
        )
    if headers and headers[0]:
        scheme, _, token = headers[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        return token.strip()
    return None


def authenticate(request: Request, *, allow_query: bool = False) -> Principal:
    """The caller, by its one token: the Authorization header, or (``allow_query``, for
    streams a browser opens without headers) ``?access_token=``. A token sent twice, or in
    both places, is refused: which one counts must not depend on who reads the request."""
    token = bearer_token(request)
    if allow_query:
        queried = query_token(request.query_params.getlist("access_token"))
        if isinstance(queried, RepeatedToken):
            raise Unauthorized(queried.message)
        if queried is not None and token is not None:
            raise Unauthorized(
                "the token came twice, in the Authorization header and as ?access_token=: "
                "send it in one place"
            )
        if token is None:
            token = queried
    if not token:
        where = "an Authorization: Bearer header" + (" or ?access_token=" if allow_query else "")
        raise Unauthorized(f"no token: send {where}")
    return services(request).verifier.verify(token)


bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A JWT signed with the server's key; scopes jobs:read, jobs:write, admin.",
)


async def principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
) -> Principal:
    """FastAPI dependency for REST routes (header only: query tokens end up in proxy logs).
    The request guard has usually verified the token already, before reading the body; its
    principal is reused. (``bearer_scheme`` only publishes the scheme in the OpenAPI
    document.)"""
    known = request.scope.get("state", {}).get(PRINCIPAL_STATE_KEY)
    if isinstance(known, Principal):
        return known
    return authenticate(request)


def _printable(text: str) -> str:
    """Text that can be sent as UTF-8: a lone surrogate from the caller's input (quoted back
    in a message or a field path) is shown escaped."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": _printable(message)}
    if field is not None:
        body["field"] = _printable(field)
    return {"error": body}


def error_response(request: Request, exc: PhasecastError) -> JSONResponse:
    """The JSON error response for a Phasecast error (routes and the request guard)."""
    status = STATUS_BY_ERROR.get(type(exc), 400)
    field = getattr(exc, "field", None)
    _count_rejection(request, exc.code)
    level = logging.ERROR if status >= 500 else logging.INFO
    log.log(level, "request rejected: %s", exc.message,
            extra={"status": status, "code": exc.code, "path": request.url.path})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if (status in (401, 413) and body_pending(request.scope)) or status == 408:
        # Refused before the body was read: stop reading it, rather than drain it.
        headers["Connection"] = "close"
    return JSONResponse(error_body(exc.code, exc.message, field), status, headers=headers)


def _field_of(location: tuple[Any, ...] | list[Any]) -> str | None:
    parts = list(location)
    if parts and parts[0] in ("body", "path", "query", "header", "cookie"):
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or None


def _problem_of(error: dict[str, Any]) -> str:
    cause = error.get("ctx", {}).get("error")
    if error.get("type") == "value_error" and cause is not None:
        return str(getattr(cause, "problem", cause))
    return str(error.get("msg", "is invalid"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PhasecastError)
    async def phasecast_error(request: Request, exc: PhasecastError) -> JSONResponse:
        return error_response(request, exc)

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
        field = _field_of(first.get("loc", ()))
        detail = _problem_of(first)
        message = f"{field}: {detail}" if field else detail
        _count_rejection(request, "invalid")
        log.info("request rejected: %s", message, extra={"path": request.url.path})
        body = error_body("invalid", message, field)
        body["error"]["details"] = [
            {"field": _printable(_field_of(e.get("loc", ())) or ""), "message": _printable(_problem_of(e))}
            for e in errors
        ]
        return JSONResponse(body, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = CODE_BY_STATUS.get(exc.status_code, "http_error")
        _count_rejection(request, code)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(app, request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
            takes = headers.get("Allow", "other methods")
            message = f"{request.method} is not allowed here; this path takes {takes}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(code, message), exc.status_code, headers=headers)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method any route serves at ``path`` (the router's own 405 names only the first
    route that matched the path), from the OpenAPI document."""
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allowed_methods", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            table.append((compile_path(template)[0], {method.upper() for method in operations}))
        app.state.allowed_methods = table
    found: set[str] = set()
    for pattern, methods in table:
        if pattern.match(path):
            found |= methods
    if "GET" in found and serves_head(path):
        found.add("HEAD")  # server/head.py
    return sorted(found)


def _count_rejection(request: Request, code: str) -> None:
    state = getattr(request.app.state, "services", None)
    if state is not None:
        state.metrics.rejected_requests.labels(code).inc()
