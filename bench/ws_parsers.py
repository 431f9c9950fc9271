"""The sans-I/O WebSocket libraries, on what the raw transport asks of one (issue 9 §3).

``python -m bench.ws_parsers [--repeat N]``

``server/rawws.py`` hands a library the upgrade request and the client's bytes, and writes
what it answers (the 101, pongs, Close frames); state messages never pass through it (they
are pre-encoded frames). So the comparison is on exactly that, per operation, in this
process (CPU time, best of ``--repeat`` rounds, both libraries taking turns):

- ``handshake``: a new connection object, the browser's upgrade request parsed, accepted,
  the 101 response bytes produced;
- ``client message``: one masked text frame of a subscribe request (~70 bytes) parsed into
  its text;
- ``ping``: a masked Ping parsed and the Pong produced;
- ``close``: the client's Close parsed and our Close reply produced.

``websockets`` is what Phasecast uses (``websockets.server.ServerProtocol``); ``wsproto``
(``wsproto.WSConnection``) is the other maintained sans-I/O implementation on PyPI.
"""

from __future__ import annotations

import argparse
import base64
import os
import struct
import time
from collections.abc import Callable

REQUEST = (
    b"GET /v1/ws?access_token=eyJhbGciOiJIUzI1NiJ9.e30.sig HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8000\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Origin: http://127.0.0.1:8000\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n\r\n"
)


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set, masked), as a browser sends it."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


SUBSCRIBE = masked(0x1, b'{"op":"subscribe","job_id":"job-000123-abcdef","since":0,"epoch":null}')
PING = masked(0x9, b"keepalive")
CLOSE = masked(0x8, struct.pack("!H", 1000) + b"bye")


# --- websockets --------------------------------------------------------------------------------

def websockets_open() -> object:
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    conn = ServerProtocol(max_size=64 * 1024)
    conn.receive_data(REQUEST)
    (request,) = conn.events_received()
    assert isinstance(request, Request)
    conn.send_response(conn.accept(request))
    assert conn.data_to_send()[0].startswith(b"HTTP/1.1 101")
    return conn


def websockets_message(conn: object) -> None:
    conn.receive_data(SUBSCRIBE)  # type: ignore[attr-defined]
    (frame,) = conn.events_received()  # type: ignore[attr-defined]
    assert bytes(frame.data).decode().startswith('{"op"')


def websockets_ping(conn: object) -> None:
    conn.receive_data(PING)  # type: ignore[attr-defined]
    conn.events_received()  # type: ignore[attr-defined]
    assert conn.data_to_send()[0][0] == 0x8A  # type: ignore[attr-defined]


def websockets_close(conn: object) -> None:
    conn.receive_data(CLOSE)  # type: ignore[attr-defined]
    conn.events_received()  # type: ignore[attr-defined]
    assert conn.data_to_send()[0][0] == 0x88  # type: ignore[attr-defined]


# --- wsproto -----------------------------------------------------------------------------------

def wsproto_open() -> object:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    conn = WSConnection(ConnectionType.SERVER)
    conn.receive_data(REQUEST)
    (request,) = list(conn.events())
    assert isinstance(request, Request)
    assert conn.send(AcceptConnection()).startswith(b"HTTP/1.1 101")
    return conn


def wsproto_message(conn: object) -> None:
    conn.receive_data(SUBSCRIBE)  # type: ignore[attr-defined]
    (message,) = list(conn.events())  # type: ignore[attr-defined]
    assert message.data.startswith('{"op"')


def wsproto_ping(conn: object) -> None:
    from wsproto.events import Ping

    conn.receive_data(PING)  # type: ignore[attr-defined]
    (ping,) = list(conn.events())  # type: ignore[attr-defined]
    assert isinstance(ping, Ping)
    assert conn.send(ping.response())[0] == 0x8A  # type: ignore[attr-defined]


def wsproto_close(conn: object) -> None:
    from wsproto.events import CloseConnection

    conn.receive_data(CLOSE)  # type: ignore[attr-defined]
    (close,) = list(conn.events())  # type: ignore[attr-defined]
    assert isinstance(close, CloseConnection)
    assert conn.send(close.response())[0] == 0x88  # type: ignore[attr-defined]


LIBRARIES: dict[str, tuple[Callable[[], object], Callable[[object], None], Callable[[object], None], Callable[[object], None]]] = {
    "websockets": (websockets_open, websockets_message, websockets_ping, websockets_close),
    "wsproto": (wsproto_open, wsproto_message, wsproto_ping, wsproto_close),
}


def measure(library: str, n: int) -> dict[str, float]:
    """µs per operation, CPU time."""
    opened, message, ping, close = LIBRARIES[library]
    figures = {}
    start = time.process_time()
    conns = [opened() for _ in range(n)]
    figures["handshake"] = (time.process_time() - start) / n * 1e6
    conn = conns[0]
    start = time.process_time()
    for _ in range(n * 10):
        message(conn)
    figures["client message"] = (time.process_time() - start) / (n * 10) * 1e6
    start = time.process_time()
    for _ in range(n * 10):
        ping(conn)
    figures["ping"] = (time.process_time() - start) / (n * 10) * 1e6
    start = time.process_time()
    for c in conns:
        close(c)
    figures["close"] = (time.process_time() - start) / n * 1e6
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_parsers", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    from importlib import metadata

    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeat):
        for library in LIBRARIES:
            for name, value in measure(library, args.connections).items():
                kept = best.setdefault(library, {})
                kept[name] = min(value, kept.get(name, value))
    print(f"load average after: {os.getloadavg()}")
    operations = list(next(iter(best.values())))
    versions = " | ".join(f"{lib} {metadata.version(lib)}" for lib in best)
    print(f"| CPU-µs per operation (best of {args.repeat}) | {versions} |")
    print("|---|" + "---:|" * len(best))
    for op in operations:
        print(f"| {op} | " + " | ".join(f"{best[lib][op]:.2f}" for lib in best) + " |")


if __name__ == "__main__":
    main()
