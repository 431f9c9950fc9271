"""The baseline: python-socketio ``AsyncServer`` + ``AsyncRedisManager`` under uvicorn, one
room per job, the same uvicorn defaults as ``phasecast serve`` had before tuning.

``python -m bench.sio_server PORT REDIS_URL CHANNEL``. A client emits ``subscribe`` with a
job id; the server joins it to that job's room and acknowledges with ``subscribed``.
Publishers emit ``state`` to the room through a write-only manager on the same channel.
"""

from __future__ import annotations

import sys

import socketio
import uvicorn


def make_app(redis_url: str, channel: str) -> socketio.ASGIApp:
    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    server = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins=[])

    @server.on("subscribe")  # type: ignore[misc]
    async def subscribe(sid: str, job_id: str) -> None:
        await server.enter_room(sid, job_id)
        await server.emit("subscribed", job_id, to=sid)

    return socketio.ASGIApp(server)


def main() -> None:
    port, redis_url, channel = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    from bench.common import raise_nofile

    raise_nofile()
    uvicorn.run(
        make_app(redis_url, channel),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
