"""Small real clients of the Phasecast protocol for tests and benchmarks: a WebSocket
watcher and an SSE reader, each recording when every state arrived."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from phasecast.model import parse_time


@dataclass(slots=True)
class Received:
    state: dict[str, Any]
    received_at: float  # Unix seconds

    @property
    def latency(self) -> float:
        """Seconds from the change being accepted to this client reading it."""
        return self.received_at - parse_time(self.state["updated_at"]).timestamp()


@dataclass
class WSWatcher:
    """One WebSocket connection; states are kept per job, other messages in ``messages``."""

    base_url: str
    token: str | None = None
    connection: ClientConnection | None = None
    states: dict[str, list[Received]] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    _inbox: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    close_code: int | None = None

    async def connect(self, *, token_in_url: bool = True, **options: Any) -> WSWatcher:
        url = self.base_url.replace("http", "ws", 1) + "/v1/ws"
        if self.token and token_in_url:
            url += f"?access_token={quote(self.token)}"
        self.connection = await websockets.connect(url, **options)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.connection is not None
        try:
            async for raw in self.connection:
                message = json.loads(raw)
                now = time.time()
                async with self._changed:
                    if message.get("type") == "state":
                        job = message["job"]
                        self.states.setdefault(job["job_id"], []).append(Received(job, now))
                    else:
                        self.messages.append(message)
                    self._changed.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.connection.close_code is not None:
                self.close_code = self.connection.close_code
            async with self._changed:
                self._changed.notify_all()

    async def send(self, message: dict[str, Any]) -> None:
        assert self.connection is not None
        await self.connection.send(json.dumps(message))

    async def subscribe(self, job_id: str, since: int | None = None) -> None:
        message: dict[str, Any] = {"op": "subscribe", "job_id": job_id}
        if since is not None:
            message["since"] = since
        await self.send(message)

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate(self)`` is true, re-checking on every message."""
        async with asyncio.timeout(timeout), self._changed:
            while not predicate(self):
                if self._reader is not None and self._reader.done() and not predicate(self):
                    raise ConnectionError(f"connection closed (code {self.close_code})")
                await self._changed.wait()

    async def wait_seq(self, job_id: str, seq: int, timeout: float = 10.0) -> Received:
        await self.wait_for(lambda w: w.last_seq(job_id) >= seq, timeout)
        return self.states[job_id][-1]

    async def wait_message(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        def found(w: WSWatcher) -> bool:
            return any(_matches(m, kind, match) for m in w.messages)

        await self.wait_for(found, timeout)
        return next(m for m in self.messages if _matches(m, kind, match))

    async def wait_terminal(self, job_id: str, timeout: float = 30.0) -> Received:
        terminal = ("COMPLETE", "FAILED", "CANCELLED")
        await self.wait_for(
            lambda w: bool(w.states.get(job_id)) and w.states[job_id][-1].state["phase"] in terminal,
            timeout,
        )
        return self.states[job_id][-1]

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.close_code

    def last_seq(self, job_id: str) -> int:
        received = self.states.get(job_id)
        return received[-1].state["seq"] if received else 0

    def seqs(self, job_id: str) -> list[int]:
        return [r.state["seq"] for r in self.states.get(job_id, [])]

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def _matches(message: dict[str, Any], kind: str, match: dict[str, Any]) -> bool:
    return message.get("type") == kind and all(message.get(k) == v for k, v in match.items())


@dataclass(slots=True)
class SSEEvent:
    id: str | None
    event: str | None
    data: str
    received_at: float

    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.data)
        return loaded


async def sse_events(
    client: httpx.AsyncClient, url: str, *, headers: dict[str, str] | None = None
) -> AsyncIterator[SSEEvent | str]:
    """Yield each event of an SSE stream, and each comment line as a plain string."""
    async with client.stream("GET", url, headers=headers) as reply:
        if reply.status_code != 200:
            await reply.aread()
            raise httpx.HTTPStatusError(
                f"SSE request failed: {reply.status_code} {reply.text}", request=reply.request,
                response=reply,
            )
        fields: dict[str, str] = {}
        data: list[str] = []
        async for line in reply.aiter_lines():
            if line == "":
                if data:
                    yield SSEEvent(fields.get("id"), fields.get("event"), "\n".join(data), time.time())
                fields, data = {}, []
            elif line.startswith(":"):
                yield line
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                else:
                    fields[name] = value
