"""RFC 6455 conformance of ``/v1/ws``, over raw sockets, against a real server on each
WebSocket transport (raw and plain ASGI).

The client here is written from the RFC, byte by byte, so that it can send what no
library would: unmasked frames, reserved bits and opcodes, broken fragmentation, oversized
control frames, bad close codes, invalid UTF-8.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from tests.conftest import WS_TRANSPORTS
from tests.support.process import ServerProcess

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
MAX_MESSAGE = 64 * 1024
WAIT = 10.0


@pytest.fixture(scope="module", params=WS_TRANSPORTS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("conformance")
    # Pings every 5 s: well apart from each test's exchanges, so keepalive never interferes.
    env = {"PHASECAST_PING_INTERVAL": "5", "PHASECAST_WS_TRANSPORT": request.param}
    with ServerProcess(f"sqlite:///{folder / 'db.sqlite'}", env=env, log_path=folder / "server.log") as process:
        yield process


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One client frame, exactly as given (RFC 6455 section 5.2)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    mask_bit = 0x80 if mask else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int:
        assert self.opcode == CLOSE and len(self.payload) >= 2
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode()


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> Frame:
        head = await asyncio.wait_for(self.reader.readexactly(2), WAIT)
        assert head[1] & 0x80 == 0, "server frames must not be masked"
        assert head[0] & 0x70 == 0, "no extension was negotiated: RSV bits must be 0"
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        payload = await asyncio.wait_for(self.reader.readexactly(size), WAIT)
        return Frame(bool(head[0] & 0x80), head[0] & 0x0F, payload)

    async def next_of(self, *opcodes: int, skip_text: Callable[[dict[str, object]], bool] | None = None) -> Frame:
        """The next frame with one of ``opcodes``; keepalive Pings and the server's
        application messages (``authenticated``, ``ping``) in between are skipped."""
        while True:
            got = await self.read_frame()
            if got.opcode in opcodes and not (
                got.opcode == TEXT and skip_text is not None and skip_text(json.loads(got.payload))
            ):
                return got
            assert got.opcode in (PING, TEXT), f"unexpected frame {got}"

    async def text(self, kind: str) -> dict[str, object]:
        """The next application message of type ``kind``."""
        got = await self.next_of(TEXT, skip_text=lambda m: m.get("type") != kind)
        message: dict[str, object] = json.loads(got.payload)
        return message

    async def expect_close(self, code: int) -> Frame:
        """The server closes with ``code``, sends nothing after its Close, and ends the TCP
        connection once we answer."""
        closing = await self.next_of(CLOSE)
        assert closing.close_code == code, closing
        await self.send(frame(CLOSE, closing.payload[:2]))
        rest = await asyncio.wait_for(self.reader.read(), WAIT)  # until the server hangs up
        assert rest == b"", f"bytes after the server's Close: {rest!r}"
        return closing

    async def ends(self) -> None:
        assert await asyncio.wait_for(self.reader.read(), WAIT) == b""


OPEN: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def close_connections() -> AsyncIterator[None]:
    yield
    while OPEN:
        writer = OPEN.pop()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def handshake(server: ServerProcess, headers: dict[str, str], path: str) -> tuple[RawClient, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    OPEN.append(writer)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    return RawClient(reader, writer), response


def upgrade_headers(**extra: str) -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **extra,
    }


@pytest.fixture
async def client(server: ServerProcess, make_token: Callable[..., str]) -> RawClient:
    connection, response = await handshake(
        server, upgrade_headers(), f"/v1/ws?access_token={quote(make_token('alice'))}"
    )
    assert response.startswith(b"HTTP/1.1 101 "), response
    await connection.text("authenticated")
    return connection


def op(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode()


# --- the opening handshake ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["8", "12", "14", None])
async def test_an_unsupported_version_gets_426_naming_version_13(server: ServerProcess, version: str | None) -> None:
    headers = upgrade_headers()
    if version is None:
        del headers["Sec-WebSocket-Version"]
    else:
        headers["Sec-WebSocket-Version"] = version
    connection, response = await handshake(server, headers, "/v1/ws")
    status, *header_lines = response.decode("latin-1").split("\r\n")
    assert status.startswith("HTTP/1.1 426 "), response
    assert "sec-websocket-version: 13" in [line.lower() for line in header_lines]
    length = next(int(line.split(":")[1]) for line in header_lines if line.lower().startswith("content-length:"))
    body = await asyncio.wait_for(connection.reader.readexactly(length), WAIT)
    assert b"13" in body  # says which version to use
    await connection.ends()


# --- control frames ---------------------------------------------------------------------------


async def test_a_ping_is_answered_with_the_same_payload(client: RawClient) -> None:
    for payload in (b"", b"hello", os.urandom(125)):
        await client.send(frame(PING, payload))
        assert (await client.next_of(PONG)).payload == payload


async def test_a_ping_between_fragments_is_answered_and_the_message_reassembled(client: RawClient) -> None:
    whole = op({"op": "ping"})
    await client.send(frame(TEXT, whole[:4], fin=False))
    await client.send(frame(PING, b"between"))
    assert (await client.next_of(PONG)).payload == b"between"
    await client.send(frame(CONT, whole[4:9], fin=False))
    await client.send(frame(PONG, b"unsolicited"))  # ignored, as the RFC allows
    await client.send(frame(CONT, whole[9:], fin=True))
    assert await client.text("pong") == {"type": "pong"}


async def test_fragmented_messages_are_reassembled(client: RawClient) -> None:
    job_id = f"missing-{uuid.uuid4().hex[:8]}"
    whole = op({"op": "subscribe", "job_id": job_id})
    parts = [whole[:1], whole[1:10], b"", whole[10:]]
    await client.send(frame(TEXT, parts[0], fin=False))
    for part in parts[1:-1]:
        await client.send(frame(CONT, part, fin=False))
    await client.send(frame(CONT, parts[-1], fin=True))
    answer = await client.text("error")
    assert (answer["job_id"], answer["code"]) == (job_id, "not_found")


# --- protocol errors: 1002 --------------------------------------------------------------------

PROTOCOL_ERRORS: dict[str, list[bytes]] = {
    "unmasked client frame": [frame(TEXT, op({"op": "ping"}), mask=False)],
    "RSV1 without an extension": [frame(TEXT, op({"op": "ping"}), rsv=4)],
    "RSV2": [frame(TEXT, op({"op": "ping"}), rsv=2)],
    "RSV3": [frame(PING, b"x", rsv=1)],
    "reserved data opcode 0x3": [frame(0x3, b"x")],
    "reserved control opcode 0xB": [frame(0xB, b"x")],
    "continuation with nothing to continue": [frame(CONT, b"x")],
    "new message inside a fragmented one": [frame(TEXT, b'{"op"', fin=False), frame(TEXT, b"{}")],
    "control frame over 125 bytes": [frame(PING, b"x" * 126)],
    "fragmented control frame": [frame(PING, b"x", fin=False)],
    "close frame with a 1-byte payload": [frame(CLOSE, b"\x03")],
    **{
        f"close code {code}": [frame(CLOSE, close_payload(code))]
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    },
}


@pytest.mark.parametrize("frames", list(PROTOCOL_ERRORS.values()), ids=list(PROTOCOL_ERRORS))
async def test_protocol_errors_close_with_1002(client: RawClient, frames: list[bytes]) -> None:
    for data in frames:
        await client.send(data)
    closing = await client.next_of(CLOSE)
    assert closing.close_code == 1002, closing
    await client.ends()  # the server hangs up after a protocol error


# --- data errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        [frame(TEXT, b'{"op":"ping","x":"\xff"}')],
        [frame(TEXT, b'{"op":"\xed\xa0\x80"}')],  # an encoded surrogate is not UTF-8
        [frame(TEXT, b'{"op":"\xc3', fin=False), frame(CONT, b'"}', fin=True)],  # split mid-character, then broken
    ],
    ids=["invalid byte", "surrogate", "broken across fragments"],
)
async def test_invalid_utf8_closes_with_1007(client: RawClient, frames: list[bytes]) -> None:
    for data in frames:
        await client.send(data)
    closing = await client.next_of(CLOSE)
    assert closing.close_code == 1007, closing
    await client.ends()


async def test_a_valid_character_split_across_fragments_is_fine(client: RawClient) -> None:
    whole = json.dumps({"op": "ping", "note": "é"}, ensure_ascii=False).encode()
    cut = whole.index("é".encode()) + 1  # between the two bytes of é
    await client.send(frame(TEXT, whole[:cut], fin=False))
    await client.send(frame(CONT, whole[cut:], fin=True))
    assert await client.text("pong") == {"type": "pong"}


async def test_an_oversized_message_closes_with_1009_before_its_payload_arrives(client: RawClient) -> None:
    # Only the header announcing 16 MiB is sent: the server must decide from it, without
    # waiting for (or buffering) the payload.
    header = struct.pack("!BBQ", 0x80 | TEXT, 0x80 | 127, 16 * 1024 * 1024) + os.urandom(4)
    await client.send(header + b"x" * 10)
    closing = await client.next_of(CLOSE)
    assert closing.close_code == 1009, closing
    await client.ends()


async def test_an_oversized_fragmented_message_closes_with_1009(client: RawClient) -> None:
    piece = b" " * (MAX_MESSAGE // 2 + 1)
    await client.send(frame(TEXT, piece, fin=False))
    await client.send(frame(CONT, piece, fin=True))
    closing = await client.next_of(CLOSE)
    assert closing.close_code == 1009, closing
    await client.ends()


async def test_a_binary_frame_closes_with_1003_and_a_reason(client: RawClient) -> None:
    await client.send(frame(BINARY, b"\x00\x01\x02"))
    closing = await client.expect_close(1003)
    assert "binary" in closing.close_reason


# --- the closing handshake --------------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(1000, "bye"), (1001, ""), (4000, "app code"), (None, "")])
async def test_a_client_close_is_echoed_and_the_server_hangs_up(
    client: RawClient, code: int | None, reason: str
) -> None:
    await client.send(frame(CLOSE, b"" if code is None else close_payload(code, reason)))
    echoed = await client.next_of(CLOSE)
    if code is None:
        assert echoed.payload == b""
    else:
        assert echoed.close_code == code
    await client.ends()


async def test_nothing_is_sent_after_the_servers_close(server: ServerProcess) -> None:
    # No token: the first message must be auth; anything else is closed with 4401.
    connection, response = await handshake(server, upgrade_headers(), "/v1/ws")
    assert response.startswith(b"HTTP/1.1 101 ")
    await connection.send(frame(TEXT, op({"op": "ping"})))
    closing = await connection.read_frame()
    assert (closing.opcode, closing.close_code) == (CLOSE, 4401)
    # Still open for reading: a ping and a message now must get no answer at all.
    await connection.send(frame(PING, b"after close"))
    await connection.send(frame(TEXT, op({"op": "ping"})))
    await connection.send(frame(CLOSE, close_payload(4401)))
    rest = await asyncio.wait_for(connection.reader.read(), WAIT)
    assert rest == b"", f"the server sent {rest!r} after its Close"


async def test_the_server_closes_the_handshake_it_started_when_the_client_answers(
    server: ServerProcess, make_token: Callable[..., str]
) -> None:
    # An expired token closes the connection with 4401 from the server's side.
    connection, response = await handshake(server, upgrade_headers(), "/v1/ws")
    assert response.startswith(b"HTTP/1.1 101 ")
    await connection.send(frame(TEXT, op({"op": "auth", "token": make_token("alice", ttl=-60)})))
    closing = await connection.expect_close(4401)
    assert "expired" in closing.close_reason


# --- a client that does not read its answers ---------------------------------------------------


async def test_a_client_flooding_requests_without_reading_loses_no_answer(
    server: ServerProcess, make_token: Callable[..., str]
) -> None:
    # A small receive buffer: the server's answers back up after a few KB.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    OPEN.append(writer)
    path = f"/v1/ws?access_token={quote(make_token('alice'))}"
    lines = [f"GET {path} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in upgrade_headers().items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)).startswith(b"HTTP/1.1 101 ")
    client = RawClient(reader, writer)
    await client.text("authenticated")
    requests = 40_000  # about 700 KB of answers that nobody reads while they are asked for
    writer.write(frame(TEXT, op({"op": "ping"})) * requests)  # no drain: the server may stop reading us
    answers = 0
    refused = False
    while answers < requests:
        got = await client.next_of(TEXT, CLOSE)
        if got.opcode == CLOSE:
            # Allowed only as a named refusal, never a silent loss: every answer before it came.
            assert got.close_code == 1008, got
            refused = True
            break
        message = json.loads(got.payload)
        if message["type"] == "pong":
            answers += 1
        else:
            assert message["type"] == "ping", message
    print(f"flood: {answers} of {requests} answered, refused with 1008: {refused}")
    assert answers == requests or (refused and answers > 0)


async def test_a_lone_empty_pong_is_read_and_the_connection_goes_on(client: RawClient) -> None:
    # What a watcher answers the keepalive Ping with, alone in a read: the raw transport
    # takes it without the library's parser; everything after must parse as before.
    await client.send(frame(PONG))
    await client.send(frame(TEXT, op({"op": "ping"})))
    assert await client.text("pong") == {"type": "pong"}
    await client.send(frame(PONG))
    whole = op({"op": "ping"})
    await client.send(frame(TEXT, whole[:4], fin=False))
    await client.send(frame(PONG))  # between fragments: ignored
    await client.send(frame(CONT, whole[4:], fin=True))
    assert await client.text("pong") == {"type": "pong"}
    await client.send(frame(PING, b"still there"))
    assert (await client.next_of(PONG)).payload == b"still there"
    # An unmasked Pong is still a protocol error: Close 1002, then the server hangs up
    # without waiting for our Close (as after every protocol error, above).
    await client.send(frame(PONG, mask=False))
    closing = await client.next_of(CLOSE)
    assert closing.close_code == 1002, closing
    await client.ends()
