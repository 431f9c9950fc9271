"""Line-based JSON control channel between the orchestrator and its child processes:
commands go to a child's stdin, events come back on its stdout, one JSON object a line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def emit(event: str, **fields: Any) -> None:
    """Child side: report an event to the orchestrator."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def command_queue() -> asyncio.Queue[dict[str, Any]]:
    """Child side: commands from stdin, delivered on the running loop (a thread reads the
    blocking pipe so the loop never does)."""
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"cmd": "stop"})

    threading.Thread(target=read, daemon=True, name="bench-stdin").start()
    return commands


class Child:
    """Orchestrator side: a child process speaking the control protocol."""

    def __init__(self, argv: list[str], name: str, source: str | None = None) -> None:
        self.name = name
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=child_env(source)
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"bench-{name}")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                sys.stderr.write(f"[{self.name}] {line}")
        self._events.put(None)

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.process.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout:.0f}s")
            try:
                found = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if found is None:
                raise RuntimeError(f"{self.name} exited ({self.process.wait()}) before {event!r}")
            if found.get("event") == "error":
                raise RuntimeError(f"{self.name}: {found.get('message')}")
            if found.get("event") == event:
                return found

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # EOF: the child reports and exits
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def child_env(source: str | None = None) -> dict[str, str]:
    """Children import ``bench`` from this checkout, whatever the current directory;
    ``source``: a ``src`` directory whose ``phasecast`` they import instead of the installed one
    (the in-process publisher of an A/B run must write as the server under test reads)."""
    root = str(Path(__file__).resolve().parent.parent)
    if source:
        root = f"{root}{os.pathsep}{source}"
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def child_argv(module: str, config: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", module, json.dumps(config)]
