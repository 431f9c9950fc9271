"""Request bodies: JSON only, parsed strictly, checked before any route sees them.

``JSONRoute`` is the route class of the REST API. Before FastAPI validates a body against
its model, the body is

- refused with 415 ``unsupported_media_type`` if it carries a Content-Type other than JSON
  (no Content-Type at all is read as JSON, so ``curl -d '{}'`` works);
- decoded as UTF-8 (400 ``invalid_json`` otherwise) and parsed (400 ``invalid_json``);
- refused (422 naming the key) if an object in it names a key twice;
- checked as JSON that every reader decodes the same way (``model.check_json``): finite
  numbers, valid Unicode, bounded nesting; 422 ``invalid`` naming the field otherwise;
- refused (422) if a field of the body object is null: optional fields are left out.

Before a byte of the body is read, the bearer token is checked (if the route takes one),
and the body is capped at the route's limit (``body_limit(request, route_name)``), at once
from ``Content-Length`` or while it streams in (``server/guard.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from phasecast.errors import InvalidJSON, InvalidUpdate, PhasecastError, UnsupportedMediaType
from phasecast.model import MAX_JSON_DEPTH, DuplicateKey, check_json, loads_untrusted
from phasecast.server.deps import authenticate, principal, services
from phasecast.server.guard import (
    PRINCIPAL_STATE_KEY,
    BodyTimedOut,
    BodyTooLarge,
    body_framing,
    capped,
    drain,
    expects_continue,
)

_UNSET: Any = object()


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_json_body(raw: bytes, content_type: str | None) -> Any:
    if content_type is not None and content_type.strip() and not is_json_media_type(content_type):
        shown = content_type if len(content_type) <= 80 else content_type[:80] + "…"
        raise UnsupportedMediaType(
            f"Content-Type {shown!r} is not supported: send the body as JSON with "
            "Content-Type: application/json (or with no Content-Type; with curl, add "
            "-H 'Content-Type: application/json' to -d)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(
            f"the request body is not valid JSON: it is not UTF-8 (byte {exc.start})"
        ) from None
    try:
        parsed = loads_untrusted(text)
    except DuplicateKey as exc:
        raise InvalidUpdate(
            exc.field, "appears more than once in one object: send each field once"
        ) from None
    except ValueError as exc:
        # JSONDecodeError, and a number too long to convert (Python's int digit limit).
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidUpdate(
            "body", f"nests far deeper than the {MAX_JSON_DEPTH} levels allowed; flatten it"
        ) from None
    # The body object is level 0, so its metadata object counts as level 1, as documented.
    check_json(parsed, "", level=0)
    if isinstance(parsed, dict):
        # Optional fields are left out, never null (FastAPI would read a top-level null as
        # "absent" without asking the model).
        for key, value in parsed.items():
            if value is None:
                raise InvalidUpdate(key, "must not be null: leave the field out instead")
    return parsed


class _ParsedRequest(Request):
    parsed: Any = _UNSET

    async def json(self) -> Any:
        if self.parsed is _UNSET:
            return await super().json()
        return self.parsed


def _uses(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(dep.call is call or _uses(dep, call) for dep in dependant.dependencies)


def body_limit(request: Request, route_name: str) -> int:
    """The body cap of a route: ``Settings.body_limits()[route_name]``, or the default."""
    settings = services(request).settings
    return settings.body_limits().get(route_name, settings.max_body_bytes)


class JSONRoute(APIRoute):
    """A route whose body is bounded, authenticated first and parsed strictly (above)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        bearer = _uses(self.dependant, principal)
        name = self.name

        async def parse_then_handle(request: Request) -> Response:
            if bearer:
                try:
                    caller = authenticate(request)
                except PhasecastError:
                    if not expects_continue(request.scope):
                        # the outer cap or deadline, while draining: the 401 stands
                        with contextlib.suppress(BodyTooLarge, BodyTimedOut):
                            await drain(request.receive)
                    raise
                request.scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = caller
            limit = body_limit(request, name)
            length, _ = body_framing(request.scope)
            checked = _ParsedRequest(request.scope, capped(request.receive, limit, length))
            raw = await checked.body()
            if raw:
                checked.parsed = parse_json_body(raw, checked.headers.get("content-type"))
            return await handler(checked)

        return parse_then_handle
