"""Fixtures for the browser end-to-end tests: a real ``phasecast demo`` server in a child
process (killable and restartable on the same port and engine) and the machine's Chromium
driven by Playwright.

Chromium comes from Debian (``apt-get install -y chromium``): Playwright cannot download
its own browsers here. The demo page must be built first (``npm ci && npm run build`` in
web/), which writes it to src/phasecast/server/static/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

REPO = Path(__file__).resolve().parents[3]
STATIC_INDEX = REPO / "src" / "phasecast" / "server" / "static" / "index.html"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The demo page reads client tuning from its query string: short backoff and probe
# intervals make recovery quick enough to watch inside one test.
FAST_RECOVERY = "?backoffBase=200&backoffCap=2000&probe=2000"


def find_chromium() -> str | None:
    for candidate in (os.environ.get("PHASECAST_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DemoServer:
    """``python -m phasecast demo`` on a fixed port and SQLite file, so a restart after
    SIGKILL comes back at the same address with the same jobs."""

    def __init__(self, folder: Path, *, speed: float) -> None:
        self.port = free_port()
        self.engine = f"sqlite:///{folder / 'demo.db'}"
        self.speed = speed
        self.log_path = folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        argv = [
            sys.executable, "-m", "phasecast", "demo",
            "--host", "127.0.0.1", "--port", str(self.port), "--engine", self.engine,
            "--no-auto-jobs", "--speed", str(self.speed),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"phasecast demo exited with {self.process.returncode}; log:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling a child process's port: no event to await
        raise TimeoutError(f"phasecast demo not healthy on {self.url} within {timeout}s; log:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL, like a crash: no shutdown hook runs, sockets drop without a close frame."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- REST helpers, as the demo page's own token ------------------------------------

    def token(self) -> str:
        config: dict[str, Any] = httpx.get(f"{self.url}/v1/demo/config", timeout=5).json()
        return str(config["token"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = httpx.get(
            f"{self.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {self.token()}"}, timeout=5
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def history(self, job_id: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.url}/v1/jobs/{job_id}/history",
            params={"limit": 1000},
            headers={"Authorization": f"Bearer {self.token()}"},
            timeout=5,
        )
        response.raise_for_status()
        events: list[dict[str, Any]] = response.json()["events"]
        return events


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); Playwright cannot download browsers here")
    if not STATIC_INDEX.exists():
        pytest.fail(f"The demo page is not built ({STATIC_INDEX} is missing): run `npm ci --engine-strict && npm run build` in web/")
    return path


def _server(tmp_path: Path, speed: float) -> Iterator[DemoServer]:
    server = DemoServer(tmp_path, speed=speed)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        # Keep the server log next to the screenshots when something went wrong.
        ARTIFACTS.mkdir(exist_ok=True)


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[DemoServer]:
    """A demo server whose generations take about 7 s (speed 4)."""
    yield from _server(tmp_path, speed=4.0)


@pytest.fixture
def slow_demo_server(tmp_path: Path) -> Iterator[DemoServer]:
    """About 20 s per generation (speed 1.5): long enough to break the network mid-way."""
    yield from _server(tmp_path, speed=1.5)


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        found = await playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield found
        finally:
            await found.close()


# Records every value the page's overall progress bars show, per job, so a test can prove
# the display itself never went backwards (not only the client's data).
WATCH_BARS = """
(() => {
  window.__bars = {};
  const record = (bar) => {
    const tracker = bar.closest('[data-job-id]');
    if (!tracker) return;
    const id = tracker.dataset.jobId;
    (window.__bars[id] = window.__bars[id] || []).push(Number(bar.getAttribute('aria-valuenow')));
  };
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === 'attributes' && m.target.getAttribute('aria-label') === 'Overall progress') record(m.target);
      for (const node of m.addedNodes || []) {
        if (node.querySelectorAll) node.querySelectorAll('[aria-label="Overall progress"]').forEach(record);
      }
    }
  }).observe(document, { subtree: true, childList: true, attributes: true, attributeFilter: ['aria-valuenow'] });
})();
"""


@pytest.fixture
async def context(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[BrowserContext]:
    found = await browser.new_context(viewport={"width": 1100, "height": 1000}, reduced_motion="reduce")
    await found.add_init_script(WATCH_BARS)
    try:
        yield found
    finally:
        await found.close()


@pytest.fixture
async def page(context: BrowserContext) -> AsyncIterator[Page]:
    found = await context.new_page()
    errors: list[str] = []
    found.on("pageerror", lambda error: errors.append(str(error)))
    yield found
    assert not errors, f"uncaught errors in the page: {errors}"


def save_json(name: str, data: Any) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(json.dumps(data, indent=2))
    return path
