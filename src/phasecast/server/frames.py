"""Every byte the streams send is encoded here, and nowhere else.

A change is encoded once per wire form and the result kept on the ``Change`` (its ``wire``
cache), so ten thousand watchers of one job share one encoding. The WebSocket form is the
complete server-to-client frame, header included: server frames are never masked
(RFC 6455 section 5.1), so the same bytes serve every connection and a transport only has to
write them.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

from phasecast.engines.base import Change
from phasecast.server.sse_cursor import entry as cursor_entry
from phasecast.server.sse_cursor import epoch_of
from phasecast.server.sse_cursor import event_id as sse_event_id

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

PING_TEXT = '{"type":"ping"}'
PONG_TEXT = '{"type":"pong"}'


# --- JSON messages of the WebSocket protocol (docs/protocol.md) ----------------------------

def message(kind: str, job_id: str | None, **fields: Any) -> str:
    """A control message: ``{"type": kind, "job_id": job_id, …fields}``."""
    return json.dumps({"type": kind, "job_id": job_id, **fields}, separators=(",", ":"))


def error(job_id: str | None, code: str, text: str) -> str:
    return message("error", job_id, code=code, message=text)


def ws_state_text(change: Change) -> str:
    """``{"type":"state","job":<state>}`` for ``change``, encoded once."""
    wire = _wire(change)
    text: str | None = wire.get("ws_text")
    if text is None:
        text = wire["ws_text"] = '{"type":"state","job":' + change.state_json + "}"
    return text


# --- WebSocket frames (RFC 6455 section 5.2), server to client: unmasked --------------------

def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One complete, final, unmasked frame."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


def ws_text_frame(text: str) -> bytes:
    return ws_frame(OP_TEXT, text.encode())


_STATE_OPEN = b'{"type":"state","job":'
_TEXT_FRAME_16 = bytes((0x80 | OP_TEXT, 126))


def ws_state_frame(change: Change) -> bytes:
    """The complete text frame carrying ``change``'s state message, encoded once (and when,
    on the monotonic clock: ``ws_state_sent_at``).

    Once per change received (each of its watchers gets these bytes): built in one go,
    header and payload, without the text form in between (``ws_state_text`` gives the same
    message as text, for the paths that want it)."""
    wire = change.wire
    if wire is None:
        wire = change.wire = {}
    frame: bytes | None = wire.get("ws_frame")
    if frame is None:
        payload = change.state_json.encode()
        size = len(payload) + len(_STATE_OPEN) + 1
        if size < 126:
            header = bytes((0x80 | OP_TEXT, size))
        elif size < 1 << 16:
            header = _TEXT_FRAME_16 + size.to_bytes(2, "big")
        else:
            header = struct.pack("!BBQ", 0x80 | OP_TEXT, 127, size)
        frame = wire["ws_frame"] = b"".join((header, _STATE_OPEN, payload, b"}"))
        wire["ws_at"] = time.monotonic()
    return frame


def ws_state_sent_at(change: Change) -> float:
    """When ``change``'s frame was encoded, i.e. first written to a watcher (``time.monotonic``):
    its watchers' writes follow within milliseconds."""
    wire = _wire(change)
    at: float | None = wire.get("ws_at")
    return time.monotonic() if at is None else at


def ws_close_frame(code: int, reason: str = "") -> bytes:
    """A Close frame; the reason is cut to fit a control frame's 125-byte payload."""
    encoded = reason.encode()[:123].decode(errors="ignore").encode()
    return ws_frame(OP_CLOSE, struct.pack("!H", code) + encoded)


PING_FRAME = ws_text_frame(PING_TEXT)
PONG_FRAME = ws_text_frame(PONG_TEXT)


# --- server-sent events ---------------------------------------------------------------------

SSE_HEARTBEAT = b": ping\n\n"


def sse_event(change: Change) -> bytes:
    """``id: <seq>.<epoch>`` / ``event: state`` / ``data: <state>`` for ``change``, encoded
    once (the per-job stream, whose ``id`` is the seq and its epoch: server/sse_cursor.py)."""
    wire = _wire(change)
    event: bytes | None = wire.get("sse")
    if event is None:
        event_id = sse_event_id(change.seq, epoch_of(change.state_json))
        event = wire["sse"] = (
            f"id: {event_id}\nevent: state\ndata: {change.state_json}\n\n".encode()
        )
    return event


def sse_event_chunk(change: Change) -> bytes:
    """``sse_event(change)`` framed as one chunk of a chunked HTTP/1.1 body, encoded once:
    what a per-job stream that owns its socket writes."""
    wire = _wire(change)
    framed: bytes | None = wire.get("sse_chunk")
    if framed is None:
        event = sse_event(change)
        framed = wire["sse_chunk"] = b"%x\r\n%b\r\n" % (len(event), event)
    return framed


def sse_state_body(change: Change) -> bytes:
    """``event: state`` / ``data: <state>`` without the ``id:`` line and the blank line that
    ends the event, encoded once (the multiplexed stream adds each stream's own cursor)."""
    wire = _wire(change)
    body: bytes | None = wire.get("sse_body")
    if body is None:
        body = wire["sse_body"] = b"event: state\ndata: " + change.state_json.encode() + b"\n"
    return body


def sse_cursor_entry(change: Change) -> bytes:
    """This change's part of a multiplexed stream's cursor (``server/sse_cursor.py``): the
    same for every stream, so made once."""
    wire = _wire(change)
    part: bytes | None = wire.get("sse_mark")
    if part is None:
        part = wire["sse_mark"] = cursor_entry(
            change.job_id, epoch_of(change.state_json), change.seq
        ).encode()
    return part


def sse_control(kind: str, data: dict[str, Any]) -> bytes:
    """A complete ``event: <kind>`` / ``data: <JSON>`` event."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _wire(change: Change) -> dict[str, Any]:
    wire = change.wire
    if wire is None:
        wire = change.wire = {}
    return wire
