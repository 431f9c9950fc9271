"""Support for the browser end-to-end tests: a real ``phasecast demo`` server in a child
process (killable and restartable on the same port and engine), where Chromium is, and
where artifacts go. Imported by conftest.py and the tests (a module name of its own, so it
cannot clash with the other conftest.py files).

Chromium comes from Debian (``apt-get install -y chromium``): Playwright cannot download
its own browsers here. The demo page must be built first (``npm ci && npm run build`` in
web/), which writes it to src/phasecast/server/static/.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
from tests.support.process import ServerProcess

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
    # Pages a test serves through Playwright's page.route (the npm-package pages) count as
    # non-local documents, and Chromium's Local Network Access checks would then block their
    # WebSocket to the loopback server (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS).
    "--disable-features=LocalNetworkAccessChecks",
]
# The demo page reads client tuning from its query string: short backoff and probe
# intervals make recovery quick enough to watch inside one test.
FAST_RECOVERY = "?backoffBase=200&backoffCap=2000&probe=2000"


def find_chromium() -> str | None:
    for candidate in (os.environ.get("PHASECAST_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DemoServer(ServerProcess):
    """``python -m phasecast demo`` on a fixed port and SQLite file, so a restart after
    SIGKILL comes back at the same address with the same jobs."""

    def __init__(self, folder: Path, *, speed: float) -> None:
        super().__init__(
            f"sqlite:///{folder / 'demo.db'}",
            command="demo",
            args=["--no-auto-jobs", "--speed", str(speed)],
            log_path=folder / "server.log",
        )

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


def save_json(name: str, data: Any) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(json.dumps(data, indent=2))
    return path
