"""The opening handshake of ``/v1/ws``: the raw transport answers the plain upgrade request
itself (``server/rawws.py``, ``plain_upgrade``) and hands everything else to the websockets
library; the ASGI transport always uses the library. Every request, plain or not, valid or
not, must get the same answer from both, over real sockets against real servers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from urllib.parse import parse_qsl, quote

import pytest
from tests.conftest import WS_TRANSPORTS
from tests.support.process import ServerProcess
from websockets.server import ServerProtocol

from phasecast.server.deps import REPEATED_TOKEN, query_token
from phasecast.server.rawws import _query_token, handshake_response, plain_upgrade

WAIT = 10.0
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


@pytest.fixture(scope="module")
def servers(ws_transport_servers: dict[str, ServerProcess]) -> dict[str, ServerProcess]:
    return ws_transport_servers


def key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def request(path: str, lines: list[str], version: str = "HTTP/1.1") -> bytes:
    return ("\r\n".join([f"GET {path} {version}", *lines]) + "\r\n\r\n").encode("latin-1")


def plain(**replace: str | None) -> list[str]:
    """A browser-like upgrade request's header lines; ``replace`` changes or (None) drops
    one (``Sec_WebSocket_Key`` for ``Sec-WebSocket-Key``)."""
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key(),
        "Sec-WebSocket-Version": "13",
    }
    for name, value in replace.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return [f"{name}: {value}" for name, value in headers.items()]


# name -> the header lines of the request
ACCEPTED: dict[str, Callable[[], list[str]]] = {
    "plain": lambda: plain(),
    "chromium": lambda: [
        *plain(Connection="Upgrade"),
        "Origin: http://127.0.0.1:5173",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0",
        "Pragma: no-cache",
        "Cache-Control: no-cache",
        "Accept-Language: en-GB,en;q=0.9",
    ],
    "firefox": lambda: [*plain(Connection="keep-alive, Upgrade", Upgrade="WebSocket"), "Origin: null"],
    "lower-case names": lambda: [line.lower() if "Key" not in line else line for line in plain()],
    "a request id": lambda: [*plain(), "X-Request-ID: storm-test-1"],
    "a tab in a value": lambda: [*plain(), "User-Agent: a\tb"],
    "a latin-1 value": lambda: [*plain(), "X-Note: caf\xe9"],
    "an empty list element": lambda: plain(Connection="keep-alive, , Upgrade"),
}
REFUSED: dict[str, Callable[[], list[str]]] = {
    "no key": lambda: plain(Sec_WebSocket_Key=None),
    "two keys": lambda: [*plain(), f"Sec-WebSocket-Key: {key()}"],
    "a key that is not base64": lambda: plain(Sec_WebSocket_Key="not base64 at all!!!!==="),
    "a key of 15 bytes": lambda: plain(Sec_WebSocket_Key=base64.b64encode(os.urandom(15)).decode()),
    "version 12": lambda: plain(Sec_WebSocket_Version="12"),
    "two versions": lambda: [*plain(), "Sec-WebSocket-Version: 13"],
    "no version": lambda: plain(Sec_WebSocket_Version=None),
    "two origins": lambda: [*plain(), "Origin: http://a.example", "Origin: http://b.example"],
    "two upgrade protocols": lambda: plain(Upgrade="websocket, h2c"),
    "a malformed subprotocol list": lambda: [*plain(), "Sec-WebSocket-Protocol: a b"],
    # RFC 6455 4.1: exactly one Host (the library does not check it).
    "no host": lambda: plain(Host=None),
    "two hosts": lambda: [*plain(), "Host: 127.0.0.2"],
}


async def exchange(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send ``raw``; the status line, headers (lower-case names; repeated ones joined) and
    the body (by Content-Length) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        status, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        body = b""
        if "content-length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT)
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def expected_accept(lines: list[str]) -> str:
    sent = next(line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("sec-websocket-key:"))
    return base64.b64encode(hashlib.sha1((sent + GUID).encode()).digest()).decode()


@pytest.mark.parametrize("name", [*ACCEPTED, *REFUSED])
async def test_both_transports_answer_every_upgrade_request_alike(
    servers: dict[str, ServerProcess], name: str
) -> None:
    lines = {**ACCEPTED, **REFUSED}[name]()
    answers = {}
    for transport, server in servers.items():
        status, headers, body = await exchange(server.port, request("/v1/ws", lines))
        headers.pop("date", None)
        headers.pop("x-request-id", None)  # one per request (uvicorn serves this one as HTTP)
        answers[transport] = (status, headers, body)
    assert answers["raw"] == answers["asgi"], name
    status, headers, _ = answers["raw"]
    if name in ACCEPTED:
        assert status == "HTTP/1.1 101 Switching Protocols", name
        assert headers["sec-websocket-accept"] == expected_accept(lines)
    else:
        assert not status.startswith("HTTP/1.1 101"), name
        if "host" in name:
            assert status.startswith("HTTP/1.1 400"), status
            assert b"exactly one Host" in body


async def test_an_http_1_0_upgrade_is_refused_with_400_by_both_transports(
    servers: dict[str, ServerProcess],
) -> None:
    """RFC 6455 4.1: the opening handshake is HTTP/1.1 or higher. uvicorn writes every
    upgrade out again as HTTP/1.1 before the WebSocket protocol sees it: without a check
    at the hand-over, an HTTP/1.0 request was answered 101."""
    for transport, server in servers.items():
        status, headers, body = await exchange(server.port, request("/v1/ws", plain(), "HTTP/1.0"))
        assert status.startswith("HTTP/1.1 400"), (transport, status)
        assert headers.get("connection") == "close"
        assert b"needs HTTP/1.1" in body, (transport, body)


@pytest.mark.parametrize("transport", WS_TRANSPORTS)
async def test_an_upgrade_with_a_token_is_authenticated_right_after_the_handshake(
    servers: dict[str, ServerProcess], transport: str, make_token: Callable[..., str]
) -> None:
    """The handshake response and ``authenticated`` may share a segment; the client sees
    the handshake first, then the message, then whatever it asks for."""
    server = servers[transport]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        path = f"/v1/ws?other=1&access_token={quote(make_token('alice'))}"
        writer.write(request(path, ACCEPTED["chromium"]()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        first, size = await asyncio.wait_for(reader.readexactly(2), WAIT)
        assert first == 0x81 and size < 126  # one unmasked, final text frame
        message = json.loads(await asyncio.wait_for(reader.readexactly(size), WAIT))
        assert message["type"] == "authenticated"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.mark.parametrize("transport", WS_TRANSPORTS)
async def test_a_bad_token_in_the_url_is_closed_with_4401_after_the_handshake(
    servers: dict[str, ServerProcess], transport: str
) -> None:
    server = servers[transport]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request("/v1/ws?access_token=not-a-jwt", plain()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        first, size = await asyncio.wait_for(reader.readexactly(2), WAIT)
        assert first == 0x88  # Close, before anything else
        payload = await asyncio.wait_for(reader.readexactly(size), WAIT)
        assert int.from_bytes(payload[:2], "big") == 4401
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.mark.parametrize("transport", WS_TRANSPORTS)
async def test_a_url_with_two_tokens_is_closed_with_4401_saying_so(
    servers: dict[str, ServerProcess], transport: str, make_token: Callable[..., str]
) -> None:
    """Which of two ``access_token`` values counts would depend on the reader: neither
    does, even when both are valid."""
    token = quote(make_token("alice"))
    reader, writer = await asyncio.open_connection("127.0.0.1", servers[transport].port)
    try:
        writer.write(request(f"/v1/ws?access_token={token}&access_token={token}", plain()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        first, size = await asyncio.wait_for(reader.readexactly(2), WAIT)
        assert first == 0x88  # Close, before anything else (no "authenticated")
        payload = await asyncio.wait_for(reader.readexactly(size), WAIT)
        assert int.from_bytes(payload[:2], "big") == 4401
        assert b"more than once" in payload
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --- the fast path itself, against the library ---------------------------------------------


def library_answer(raw: bytes) -> bytes | None:
    """What the websockets library answers to ``raw`` when it accepts it (None if not)."""
    protocol = ServerProtocol()
    protocol.receive_data(raw)
    events = protocol.events_received()
    if not events:
        return None
    response = protocol.accept(events[0])  # type: ignore[arg-type]
    if response.status_code != 101:
        return None
    protocol.send_response(response)
    return b"".join(protocol.data_to_send())


def without_date(response: bytes) -> bytes:
    return b"\r\n".join(line for line in response.split(b"\r\n") if not line.startswith(b"Date: "))


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_the_plain_request_path_answers_exactly_as_the_library(name: str) -> None:
    lines = ACCEPTED[name]()
    raw = request("/v1/ws?access_token=x", lines)
    found = plain_upgrade(raw)
    expected = library_answer(raw)
    assert expected is not None
    if found is None:
        # Not plain (a tab, a latin-1 byte, an empty list element): the library answers.
        assert name in ("a tab in a value", "a latin-1 value", "an empty list element")
        return
    target, sent_key, _ = found
    assert target == "/v1/ws?access_token=x"
    assert without_date(handshake_response(sent_key)) == without_date(expected)


@pytest.mark.parametrize("name", list(REFUSED))
def test_the_plain_request_path_takes_nothing_the_library_refuses(name: str) -> None:
    raw = request("/v1/ws", REFUSED[name]())
    if "host" not in name:  # the library takes any Host; ``_on_request`` checks it
        assert library_answer(raw) is None
    assert plain_upgrade(raw) is None


def test_the_plain_request_path_leaves_unusual_shapes_to_the_library() -> None:
    base = request("/v1/ws", plain())
    assert plain_upgrade(base) is not None
    cases = [
        base.replace(b"GET ", b"POST ", 1),
        base.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        base[:-2],  # unfinished
        base + b"extra",  # bytes after the request
        base.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
        base.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n"),
        base.replace(b"\r\n\r\n", b"\r\nBad Name: x\r\n\r\n"),
        base.replace(b"\r\n\r\n", b"\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n"),
        base.replace(b"\r\n\r\n", b"\r\n" + b"X-A: 1\r\n" * 129 + b"\r\n"),
    ]
    for raw in cases:
        assert plain_upgrade(raw) is None, raw[:80]


@pytest.mark.parametrize(
    "query",
    [
        "access_token=abc.def_ghi-1", "access_token=", "access_token", "access_token=a=b",
        "x=1&access_token=z", "access_token=a%20b", "access_token=a+b",
        "access_token=1&access_token=2", "access_token=1&x=2&access_token=1", "access_tokenx=1", "",
    ],
)
def test_the_url_token_is_read_as_starlette_reads_it(query: str) -> None:
    """The raw upgrade reads ``access_token`` itself (a shortcut for the usual
    ``access_token=<jwt>`` query); whatever the query, the same value as the ASGI path,
    which reads Starlette's parsed pairs: one value, none, or ``REPEATED_TOKEN``."""
    values = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "access_token"]
    expected = query_token(values)
    assert _query_token(query) == expected
    assert (expected is REPEATED_TOKEN) == (len(values) > 1)

