"""Minimal asyncio clients for the load generator: RFC 6455 WebSocket (also carrying
Engine.IO/Socket.IO text packets) and HTTP/1.1 server-sent events.

Why not the ``websockets``/``httpx`` clients: with 10,000 connections on a 2-core machine the
measuring tool must cost far less than the server it measures. A ``Protocol`` with a
hand-rolled frame parser costs a few µs per message; a full client stack costs tens, and
the load generator would then take the cores away from the server under test. The parsers
only accept what the servers send (unmasked server frames, chunked responses).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from typing import cast

TextHandler = Callable[[str], None]
CloseHandler = Callable[[int | None], None]


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    length = len(payload)
    repeated = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return key + masked


def client_frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return header + _mask(payload)


class WebSocketClient(asyncio.Protocol):
    """One WebSocket connection. ``on_text`` gets every text message; ``on_close`` the close
    code (None when the TCP connection just dropped)."""

    def __init__(self, host: str, path: str, on_text: TextHandler, on_close: CloseHandler) -> None:
        self.host = host
        self.path = path
        self.on_text = on_text
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] = []
        self._close_code: int | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(0x1, text.encode()))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(0x8, struct.pack("!H", 1000)))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[:12])
            del buffer[: end + 4]
            if not status.endswith(b"101"):
                if not self.open.done():
                    self.open.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                assert self.transport is not None
                self.transport.close()
                return
            self._upgraded = True
            if not self.open.done():
                self.open.set_result(None)
        self._parse_frames()

    def _parse_frames(self) -> None:
        buffer = self._buffer
        offset = 0
        size = len(buffer)
        while size - offset >= 2:
            b0 = buffer[offset]
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if size - offset < 4:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
                start = offset + 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 10], "big")
                start = offset + 10
            end = start + length
            if end > size:
                break
            payload = bytes(buffer[start:end])
            offset = end
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        if offset:
            del buffer[:offset]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (0x1, 0x0):
            self._fragments.append(payload)
            if fin:
                text = b"".join(self._fragments).decode()
                self._fragments.clear()
                self.on_text(text)
        elif opcode == 0x8:
            self._close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            assert self.transport is not None
            if not self.transport.is_closing():
                self.transport.write(client_frame(0x8, payload[:2]))
                self.transport.close()
        elif opcode == 0x9 and self.transport is not None:
            self.transport.write(client_frame(0xA, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(ConnectionError("connection lost before the handshake"))
        if not self._closed:
            self._closed = True
            self.on_close(self._close_code)


class SSEClient(asyncio.Protocol):
    """One ``text/event-stream`` GET; ``on_text`` gets the ``data:`` of every event."""

    def __init__(
        self, host: str, path: str, headers: dict[str, str], on_text: TextHandler, on_close: CloseHandler
    ) -> None:
        self.host = host
        self.path = path
        self.headers = headers
        self.on_text = on_text
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._raw = bytearray()
        self._body = bytearray()
        self._headers_done = False
        self._chunked = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode()
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        raw = self._raw
        raw += data
        if not self._headers_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(raw[:end]).lower()
            del raw[: end + 4]
            if not head.startswith(b"http/1.1 200"):
                if not self.open.done():
                    self.open.set_exception(ConnectionError(f"refused: {head[:40]!r}"))
                assert self.transport is not None
                self.transport.close()
                return
            self._chunked = b"transfer-encoding: chunked" in head
            self._headers_done = True
            self.open.set_result(None)
        if self._chunked:
            self._dechunk()
        else:
            self._body += raw
            raw.clear()
        self._events()

    def _dechunk(self) -> None:
        raw = self._raw
        offset = 0
        while True:
            line_end = raw.find(b"\r\n", offset)
            if line_end < 0:
                break
            length = int(bytes(raw[offset:line_end]).split(b";")[0], 16)
            start = line_end + 2
            if len(raw) < start + length + 2:
                break
            self._body += raw[start : start + length]
            offset = start + length + 2
            if length == 0 and self.transport is not None:
                self.transport.close()
        if offset:
            del raw[:offset]

    def _events(self) -> None:
        body = self._body
        offset = 0
        while True:
            end = body.find(b"\n\n", offset)
            if end < 0:
                break
            block = bytes(body[offset:end])
            offset = end + 2
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    self.on_text(line[6:].decode())
        if offset:
            del body[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(ConnectionError("connection lost before the response"))
        if not self._closed:
            self._closed = True
            self.on_close(None)


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection for JSON POSTs. httpx's pool costs milliseconds of
    CPU per request under concurrency, which would make the publisher, not the server, the
    bottleneck of an ingest benchmark; one of these per concurrent writer costs ~50 µs."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host = host
        self.port = port
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self._headers}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
