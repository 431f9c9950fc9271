"""Installs the way users install it: the wheel, built from this tree, installed without
extras into a fresh virtual environment, runs ``phasecast demo`` until a comic completes
over HTTP. No Redis driver, no PostgreSQL driver, no test scaffolding in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import httpx
import pytest
from tests.support.process import free_port, kill_and_wait, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], cwd: Path, timeout: float) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed without extras; returns its bin directory."""
    folder = tmp_path_factory.mktemp("wheel")
    # pip resolves the build backend and the dependencies from its cache and configured
    # indexes: no network is needed once they were installed on this machine.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(folder / "dist"), str(ROOT)],
         folder, 300)
    (wheel,) = (folder / "dist").glob("phasecast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "phasecast/simulators/runpod.py" in names
    assert not [n for n in names if n.startswith(("phasecast/testing/", "tests/"))], "test scaffolding shipped"
    venv.EnvBuilder(with_pip=True, clear=True).create(folder / "venv")
    bin_dir = folder / "venv" / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(wheel)], folder, 400)
    return bin_dir


def test_the_wheel_has_no_driver_extras(installed: Path) -> None:
    for driver in ("redis", "asyncpg"):
        probe = subprocess.run([str(installed / "python"), "-c", f"import {driver}"], capture_output=True,
                               check=False)
        assert probe.returncode != 0, f"{driver} is installed without its extra"


def test_demo_from_the_wheel_completes_a_comic_over_http(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHASECAST_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{installed}{os.pathsep}{env.get('PATH', '')}"
    with log_path.open("wb") as log:
        demo = subprocess.Popen(
            [str(installed / "phasecast"), "demo", "--port", str(port), "--speed", "8", "--no-auto-jobs"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, 60, demo)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            token = http.get("/v1/demo/config").json()["token"]
            started = http.post("/v1/demo/generations", json={"panels": 3, "title": "From the wheel"})
            assert started.status_code == 201, started.text
            job_id = started.json()["job_id"]
            deadline = time.monotonic() + 120
            phases: list[str] = []
            while True:
                state = http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}).json()
                if not phases or phases[-1] != state["phase"]:
                    phases.append(state["phase"])
                if state["phase"] in ("COMPLETE", "FAILED", "CANCELLED") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert state["phase"] == "COMPLETE", (state, log_path.read_text())
            assert "GENERATING" in phases, phases
            # The panels were drawn on the (simulated) RunPod, kept in the embedded engine.
            panels = http.get(f"/v1/integrations/runpod/jobs/{job_id}/panels",
                              headers={"Authorization": f"Bearer {token}"}).json()["panels"]
            assert [p["status"] for p in panels] == ["done"] * 3, panels
            assert all(p["runpod_id"] for p in panels), panels
    finally:
        kill_and_wait(demo)
    output = log_path.read_text()
    assert f"open http://127.0.0.1:{port}/" in output
    # Routine traffic (every poll, report and webhook) stays out of the terminal.
    assert "phasecast.access" not in output, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
