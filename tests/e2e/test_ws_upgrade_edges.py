"""The edges of ``/v1/ws`` that are not WebSocket yet: asked as plain HTTP it answers 426 and
says how to open it (not 404); an upgrade request the library cannot parse (a body, chunked
encoding) is answered 400 with the reason (not a connection ended without a word); frames a
client sends in the same write as its upgrade request are read, not lost. Over real sockets,
against real servers, on both WebSocket transports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os

import pytest
from tests.conftest import WS_TRANSPORTS
from tests.support.process import ServerProcess

WAIT = 10.0


@pytest.fixture(scope="module")
def servers(ws_transport_servers: dict[str, ServerProcess]) -> dict[str, ServerProcess]:
    return ws_transport_servers


def upgrade(*extra: str, path: str = "/v1/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame (masked, as RFC 6455 requires of clients)."""
    assert len(payload) < 65536
    size = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    mask = os.urandom(4)
    return bytes([0x80 | opcode]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def exchange(server: ServerProcess, data: bytes) -> bytes:
    """Send ``data`` in one write; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def head_and_body(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


PLAIN_HTTP = {
    "no-upgrade": b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    "other-upgrade": b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: h2c\r\nConnection: Upgrade, close\r\n\r\n",
    "upgrade-without-connection": (b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                                   b"Sec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n"),
}


@pytest.mark.parametrize("transport", WS_TRANSPORTS)
@pytest.mark.parametrize("case", sorted(PLAIN_HTTP))
async def test_plain_http_on_the_websocket_path_is_told_to_upgrade(
    servers: dict[str, ServerProcess], transport: str, case: str
) -> None:
    status, headers, body = head_and_body(await exchange(servers[transport], PLAIN_HTTP[case]))
    assert status == 426, (status, body)
    assert headers.get("upgrade") == "websocket"
    error = json.loads(body)["error"]
    assert error["code"] == "upgrade_required" and "Sec-WebSocket-Version: 13" in error["message"]


UNPARSED = {
    "body": upgrade("Content-Length: 5") + b"hello",
    "chunked": upgrade("Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("transport", WS_TRANSPORTS)
@pytest.mark.parametrize("case", sorted(UNPARSED))
async def test_an_upgrade_request_with_a_body_is_refused_with_400_and_its_reason(
    servers: dict[str, ServerProcess], transport: str, case: str
) -> None:
    status, headers, body = head_and_body(await exchange(servers[transport], UNPARSED[case]))
    assert status == 400, (status, body)
    assert headers.get("connection") == "close"
    assert b"no body" in body
    assert int(headers["content-length"]) == len(body)


async def test_frames_sent_with_the_upgrade_request_are_read(
    servers: dict[str, ServerProcess], make_token: object
) -> None:
    """A client that does not wait for the 101 before its first frames (RFC 6455 says it must
    wait; the server still reads what it sent) gets them answered, not a 4401 ten seconds
    later for an auth message the server dropped."""
    server = servers["raw"]
    token = make_token("alice")  # type: ignore[operator]
    first = masked(json.dumps({"op": "auth", "token": token}).encode()) + masked(b'{"op":"ping"}')
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(upgrade() + first)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 ")
        received = []
        for _ in range(2):
            opcode_byte, size = await asyncio.wait_for(reader.readexactly(2), WAIT)
            assert opcode_byte == 0x81 and size < 126
            received.append(json.loads(await asyncio.wait_for(reader.readexactly(size), WAIT)))
        assert [m["type"] for m in received] == ["authenticated", "pong"]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_garbage_sent_with_the_upgrade_request_closes_with_1002(servers: dict[str, ServerProcess]) -> None:
    answer = await exchange(servers["raw"], upgrade() + b"GET / HTTP/1.1\r\n\r\n")
    _, _, frames = answer.partition(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert frames[0] == 0x88 and int.from_bytes(frames[2:4], "big") == 1002, frames
