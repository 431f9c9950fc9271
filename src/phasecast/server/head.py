"""``HEAD`` for every plain ``GET`` route (RFC 9110 9.3.2): the status and headers the
``GET`` would send, without its body. Monitoring probes often ask ``HEAD /healthz``.

The event streams (``/v1/events``, ``/v1/jobs/{id}/events``) are left out: a stream's
response never ends, so ``HEAD`` there is answered 405 with ``Allow: GET``. The 405 handler
(``deps.allowed_methods``) asks ``serves_head`` too, so ``Allow`` names ``HEAD`` exactly
where it is served.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_STREAMS = re.compile(r"/v1/events|/v1/jobs/[^/]+/events")


def serves_head(path: str) -> bool:
    """Whether ``HEAD`` is served at ``path`` wherever ``GET`` is."""
    return _STREAMS.fullmatch(path) is None


class HeadAsGet:
    """Runs a ``HEAD`` request as ``GET`` and drops the body of its response (uvicorn drops
    it too, by the method it saw; other servers need it dropped here)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or not serves_head(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {"type": "http.response.body", "body": b"",
                           "more_body": message.get("more_body", False)}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
