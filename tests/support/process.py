"""Run real Phasecast servers and private Redis servers as child processes (tests, benchmarks).

Nothing here patches Phasecast: a ``ServerProcess`` is the ``phasecast`` command itself,
listening on a real port, and can be killed with SIGKILL and started again on the same port
and engine to test recovery.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

TEST_SECRET = "phasecast-test-secret-0123456789abcdefghijklmnop"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


def sockets_to(port: int) -> set[str]:
    """The TCP sockets this process holds open to ``port`` on the remote side (their inode
    numbers), read from /proc: what a client left open, whatever the library holding it."""
    held: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                held.add(target[len("socket:["):-1])
    found: set[str] = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            next(rows)  # the header
            for row in rows:
                fields = row.split()
                # fields: sl, local address, remote address (hex host:port), state, ..., inode (#10)
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in held:
                    found.add(fields[9])
    return found


def kill_and_wait(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


class ServerProcess:
    """``phasecast serve`` (or ``demo``) in a child process."""

    def __init__(
        self,
        engine: str,
        *,
        port: int | None = None,
        command: str = "serve",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.engine = engine
        self.port = port or free_port()
        self.command = command
        self.args = list(args)
        self.env = {
            **os.environ,
            "PHASECAST_JWT_SECRET": TEST_SECRET,
            "PHASECAST_LOG_LEVEL": "info",
            **(env or {}),
        }
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="phasecast-server-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        # 60 s, not less: on the shared 2-core machine at load 11 a server (a cluster engine,
        # serve --workers 2) has taken more than 20 s to listen. One that exits fails at once.
        argv = [
            sys.executable, "-m", "phasecast", self.command,
            "--host", "127.0.0.1", "--port", str(self.port), "--engine", self.engine, *self.args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout, self.process)
            self._wait_ready(timeout)
        except BaseException:
            # A server that did not come up in time is stopped here: the caller never gets
            # it to stop (it was left running, and its Popen warned "still running" later).
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server on {self.url} not ready; log: {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as in a crash."""
        kill_and_wait(self.process)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class PrivateRedis:
    """A ``redis-server`` of our own on a free port, for tests that restart, kill or flush
    Redis: the machine's shared Redis is never touched by those."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="phasecast-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10, self.process)
        return self

    def kill(self) -> None:
        kill_and_wait(self.process)
        self.process = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
