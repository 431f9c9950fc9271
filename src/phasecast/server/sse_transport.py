"""The raw seam for server-sent events: an SSE stream takes its connection over from uvicorn.

A stream is set up through ASGI like any request (routing, middleware, auth, the response
head and its first events go through ``send``), then asks for the connection's transport
with the ``phasecast.sse.detach`` scope extension. From then on the stream writes
pre-encoded, chunk-framed bytes straight to the transport from the hub's dispatch: no task
parked per stream, no middleware frames, no ASGI ``send`` per event. The protocol forwards
flow control (``pause_writing``/``resume_writing``), the end of the connection and the
server's shutdown to the stream.

``HttpProtocol`` is uvicorn's httptools protocol plus that extension, handed to uvicorn
through its ``http`` setting (``phasecast serve`` does). Under any other server the extension
is absent and streams write through ASGI ``send`` from a task of their own: both paths serve
the same bytes and pass the same tests.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DETACH = "phasecast.sse.detach"
LAST_CHUNK = b"0\r\n\r\n"


class Sink(Protocol):
    """What a detached stream hears from its connection."""

    def connection_lost(self) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def shutdown(self) -> None:
        """The server is stopping: end the response properly and close."""


def chunk(body: bytes) -> bytes:
    """``body`` as one chunk of a chunked HTTP/1.1 response body."""
    return b"%x\r\n%b\r\n" % (len(body), body)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the ``phasecast.sse.detach`` extension."""

    sink: Sink | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions: dict[str, Any] = {DETACH: self._detach}
        self.scope["extensions"] = extensions

    def _detach(self, sink: Sink) -> asyncio.Transport | None:
        """Hand the transport over to ``sink``, or return None (then the stream stays on
        ASGI). Only a response that is started, chunked and still open may be detached,
        and only when no other request is queued on the connection."""
        cycle = self.cycle
        if (
            self.sink is not None
            or cycle is None
            or not cycle.response_started
            or cycle.response_complete
            or cycle.disconnected
            or not cycle.chunked_encoding
            or self.pipeline
            or self.transport.is_closing()
        ):
            return None
        # uvicorn must neither close nor complain when the ASGI app returns now: as far as
        # it knows, this response is complete and the connection not to be reused.
        cycle.response_complete = True
        cycle.keep_alive = False
        self.sink = sink
        # Keep reading, so the end of the connection is noticed at once.
        self.flow.resume_reading()
        # Nothing of the request, the parser or uvicorn's flow control is needed any more
        # (this protocol forwards flow control to the sink): an idle stream keeps only this
        # object, its transport and the stream.
        self.cycle = None  # type: ignore[assignment]
        self.scope = None  # type: ignore[assignment]
        self.headers = None  # type: ignore[assignment]
        self.parser = None  # type: ignore[assignment]
        self.flow = None  # type: ignore[assignment]
        self.pipeline = None  # type: ignore[assignment]
        self.url = b""
        return self.transport

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            return  # a stream takes no further requests; whatever the client sends is dropped
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.connection_lost()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_writing()
        elif self.flow is not None:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_writing()
        elif self.flow is not None:
            super().resume_writing()

    def shutdown(self) -> None:
        if self.sink is not None:
            self.sink.shutdown()
            return
        super().shutdown()


def detacher(scope: dict[str, Any] | Any) -> Any:
    """The detach callable of this request, if the server offers one."""
    extensions = scope.get("extensions") or {}
    return extensions.get(DETACH)
