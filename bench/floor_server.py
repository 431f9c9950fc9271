"""The physical floor of WebSocket fan-out on this machine: a raw uvloop server that does the
least work a fan-out server can do, so every Phasecast figure has it beside it.

``python -m bench.floor_server PORT REDIS_URL CHANNEL``

- Feed: Redis pub/sub, the same way Phasecast hears changes. One subscriber connection; a
  job's channel (``CHANNEL:<job>``) is subscribed when its first watcher arrives. The
  publisher is ``bench.publisher`` in ``redis`` mode: a bare ``PUBLISH`` of a state of the
  same shape and size as Phasecast's. RESP push messages are parsed by hand (a few lines,
  no client library in the way).
- Encoding: each change is encoded once into the complete server-to-client WebSocket frame
  (``{"type":"state","job":<state>}``, header included; server frames are unmasked, so the
  same bytes serve every watcher), then written to every watcher of that job with
  ``transport.write``. No flow control, no mailbox, no ordering checks, no auth, no pings:
  only the handshake, the subscribe message and the writes.
- Watchers: a client completes the RFC 6455 handshake on any path and sends one text frame
  ``{"op":"subscribe","job_id":…}``; the server answers with the job's latest frame (or a
  ``seq`` 1 state if it has none yet), as Phasecast sends the current state on subscribe.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlparse

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(payload: bytes) -> bytes:
    """A complete unmasked text frame (FIN, opcode 1)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


class Hub:
    def __init__(self, channel: str) -> None:
        self.prefix = channel + ":"
        self.watchers: dict[str, list[asyncio.Transport]] = {}
        self.latest: dict[str, bytes] = {}
        self.feed: RedisFeed | None = None

    def subscribe(self, job: str, transport: asyncio.Transport) -> None:
        group = self.watchers.get(job)
        if group is None:
            group = self.watchers[job] = []
            assert self.feed is not None
            self.feed.subscribe(self.prefix + job)
        group.append(transport)
        transport.write(self.latest.get(job) or _initial_frame(job))

    def unsubscribe(self, job: str, transport: asyncio.Transport) -> None:
        group = self.watchers.get(job)
        if group is not None and transport in group:
            group.remove(transport)

    def publish(self, channel: bytes, payload: bytes) -> None:
        job = channel[len(self.prefix) :].decode()
        data = frame(b'{"type":"state","job":' + payload + b"}")  # encoded once per change
        self.latest[job] = data
        for transport in self.watchers.get(job, ()):
            transport.write(data)


def _initial_frame(job: str) -> bytes:
    from phasecast.model import new_job

    state: dict[str, Any] = new_job(
        job_id=job, owner="bench-viewer", kind="comic", metadata={}, now=datetime.now(UTC)
    ).to_dict()
    state["seq"] = 1
    return frame(json.dumps({"type": "state", "job": state}, separators=(",", ":")).encode())


class RedisFeed(asyncio.Protocol):
    """A Redis pub/sub connection: ``SUBSCRIBE`` commands out, ``message`` pushes in."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def subscribe(self, channel: str) -> None:
        name = channel.encode()
        assert self.transport is not None
        self.transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(name), name))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        while True:
            parsed = _push(buffer, offset)
            if parsed is None:
                break
            items, offset = parsed
            if items[0] == b"message":
                self.hub.publish(items[1], items[2])
        if offset:
            del buffer[:offset]


def _push(buffer: bytearray, offset: int) -> tuple[list[bytes], int] | None:
    """One RESP array of bulk strings / integers from ``buffer[offset:]``, or None if incomplete."""
    end = buffer.find(b"\r\n", offset)
    if end < 0:
        return None
    if buffer[offset] != ord("*"):
        raise ValueError(f"unexpected RESP reply {bytes(buffer[offset:end])!r}")
    count = int(buffer[offset + 1 : end])
    position = end + 2
    items: list[bytes] = []
    for _ in range(count):
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None
        kind = buffer[position]
        if kind == ord(":"):
            items.append(bytes(buffer[position + 1 : end]))
            position = end + 2
            continue
        size = int(buffer[position + 1 : end])
        start = end + 2
        if len(buffer) < start + size + 2:
            return None
        items.append(bytes(buffer[start : start + size]))
        position = start + size + 2
    return items, position


class Watcher(asyncio.Protocol):
    """One WebSocket client: handshake, one subscribe frame, then only our writes."""

    __slots__ = ("buffer", "hub", "job", "transport", "upgraded")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.job: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        transport = self.transport
        assert transport is not None
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            key = b""
            for line in bytes(buffer[:end]).split(b"\r\n"):
                if line.lower().startswith(b"sec-websocket-key:"):
                    key = line.split(b":", 1)[1].strip()
            del buffer[: end + 4]
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.upgraded = True
        while len(buffer) >= 6:
            length = buffer[1] & 0x7F
            start = 2
            if length == 126:
                length = int.from_bytes(buffer[2:4], "big")
                start = 4
            elif length == 127:
                length = int.from_bytes(buffer[2:10], "big")
                start = 10
            if len(buffer) < start + 4 + length:
                return
            opcode = buffer[0] & 0x0F
            mask = buffer[start : start + 4]
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buffer[start + 4 : start + 4 + length]))
            del buffer[: start + 4 + length]
            if opcode == 0x8:
                transport.write(b"\x88\x02" + payload[:2])
                transport.close()
                return
            if opcode == 0x1 and self.job is None:
                request = json.loads(payload)
                if request.get("op") == "subscribe":
                    self.job = str(request["job_id"])
                    self.hub.subscribe(self.job, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.job is not None and self.transport is not None:
            self.hub.unsubscribe(self.job, self.transport)


async def serve(port: int, redis_url: str, channel: str) -> None:
    loop = asyncio.get_running_loop()
    hub = Hub(channel)
    where = urlparse(redis_url)
    _, feed = await loop.create_connection(
        lambda: RedisFeed(hub), where.hostname or "127.0.0.1", where.port or 6379
    )
    hub.feed = feed
    server = await loop.create_server(lambda: Watcher(hub), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    from bench.common import raise_nofile

    raise_nofile()
    port, redis_url, channel = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import uvloop

    uvloop.run(serve(port, redis_url, channel))


if __name__ == "__main__":
    main()
