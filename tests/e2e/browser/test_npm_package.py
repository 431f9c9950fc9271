"""The npm package as its users get it: `npm pack`, installed into a fresh project.

- The tarball carries README, LICENSE and both entry points, names the source repository only
  as the Python package does (none while pyproject.toml gives none), and React is an optional
  peer dependency: installing the package alone installs no React.
- `@phasecast/client` (the framework-free ProgressClient) imports and type-checks without
  React; `@phasecast/client/react` says it needs React when React is missing, and works with
  the app's own React once installed.
- A page that imports only ProgressClient, bundled by Vite in a project without React, runs
  in real Chromium against a real ``phasecast demo`` server and watches a comic to COMPLETE.

Installs are offline (``npm install --offline``): the tarball has no dependencies, and the
React that the second half installs is packed from web/node_modules.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from browser_support import REPO, DemoServer
from playwright.async_api import Page, Route
from tests.support.process import TEST_SECRET

WEB = REPO / "web"
NODE_MODULES_BIN = WEB / "node_modules" / ".bin"
VITE = WEB / "node_modules" / "vite" / "bin" / "vite.js"
PIPELINE = ["QUEUED", "ANALYZING", "GENERATING", "POST_PROCESSING", "COMPLETE"]


def run(args: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # No npm update checks or audits: the tests must run without the network.
    env = {
        **os.environ,
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
        # CI=true makes the build tools colour their output; keep it plain so it can be read.
        "NO_COLOR": "1",
    }
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("npm") is None or not VITE.exists():
        pytest.fail("npm and web/node_modules are needed: run `npm ci` in web/")
    folder = tmp_path_factory.mktemp("pack")
    # `prepack` builds the library first, so the tarball is what `npm publish` would upload.
    out = ok(run(["npm", "pack", "--json", "--pack-destination", str(folder)], cwd=WEB, timeout=120))
    # `npm pack --json` prints its JSON array last, after whatever `prepack` printed.
    start = re.search(r"^\[", out, re.MULTILINE)
    assert start is not None, f"no JSON from npm pack:\n{out}"
    name = json.loads(out[start.start() :])[0]["filename"]
    path = folder / Path(name).name
    assert path.exists(), f"npm pack did not write {path}"
    return path


def new_project(folder: Path, tarball: Path) -> Path:
    """A fresh app with only our package installed, far from web/node_modules (no React up the tree)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text(json.dumps({"name": "consumer", "private": True, "type": "module"}))
    ok(run(["npm", "install", "--offline", "--no-audit", "--no-fund", str(tarball)], cwd=folder))
    return folder


def node_eval(project: Path, script: str) -> subprocess.CompletedProcess[str]:
    return run(["node", "--input-type=module", "-e", script], cwd=project)


def test_tarball_carries_readme_license_and_both_entries(tarball: Path) -> None:
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
        manifest_file = archive.extractfile("package/package.json")
        assert manifest_file is not None
        manifest: dict[str, Any] = json.load(manifest_file)
        index_file = archive.extractfile("package/dist/index.js")
        assert index_file is not None
        index_js = index_file.read().decode()
    for required in (
        "README.md",
        "LICENSE",
        "package.json",
        "dist/index.js",
        "dist/index.d.ts",
        "dist/react.js",
        "dist/react/index.d.ts",
        "dist/styles.css",
    ):
        assert f"package/{required}" in names, f"{required} is missing from the tarball: {sorted(names)}"
    assert manifest["license"] == "MIT"
    # The same source address as the Python package's ([project.urls] Repository), none while
    # the project publishes none: a placeholder would send users to someone else's page.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    published = project.get("urls", {}).get("Repository")
    if published is None:
        assert "repository" not in manifest, manifest["repository"]
    else:
        assert manifest["repository"]["url"].removeprefix("git+").removesuffix(".git") == published
    assert manifest["exports"]["./react"]["import"] == "./dist/react.js"
    assert manifest["peerDependenciesMeta"]["react"] == {"optional": True}
    assert not manifest.get("dependencies"), "the client must not pull anything into the app"
    assert "react" not in index_js


def test_installed_package_imports_without_react_and_react_entry_with_it(
    tarball: Path, tmp_path: Path
) -> None:
    project = new_project(tmp_path / "app", tarball)
    assert not (project / "node_modules" / "react").exists(), (
        "installing the client pulled React into a non-React app"
    )

    # The framework-free entry loads and works in Node without React.
    root = node_eval(
        project,
        """
        const m = await import('@phasecast/client');
        const client = new m.ProgressClient({ baseUrl: 'http://127.0.0.1:9', transports: ['polling'] });
        console.log(JSON.stringify({ client: typeof m.ProgressClient, status: client.getConnection().status,
          eta: m.formatEta(42), shown: m.displayProgress({ phase: 'POST_PROCESSING', progress: 99.7 }),
          hook: 'useGenerationProgress' in m }));
        """,
    )
    assert json.loads(ok(root)) == {
        "client": "function",
        "status": "closed",
        "eta": "about 40 s left",
        "shown": 99,
        "hook": False,
    }

    # Its type declarations compile without React types (skipLibCheck off: every .d.ts is checked).
    (project / "check.ts").write_text(
        "import { ProgressClient, type JobState } from '@phasecast/client';\n"
        "const client: ProgressClient = new ProgressClient({ baseUrl: 'http://x', token: async () => 't' });\n"
        "const state: JobState | null = client.getJob('a').state;\n"
        "export const phase = state?.phase;\n"
    )
    ok(
        run(
            [
                str(NODE_MODULES_BIN / "tsc"),
                "--noEmit",
                "--strict",
                "--skipLibCheck",
                "false",
                "--target",
                "es2022",
                "--module",
                "esnext",
                "--moduleResolution",
                "bundler",
                "--lib",
                "es2022,dom",
                "check.ts",
            ],
            cwd=project,
        )
    )

    # The React entry says what it needs when React is absent ...
    missing = node_eval(project, "await import('@phasecast/client/react');")
    assert missing.returncode != 0
    assert "Cannot find package 'react'" in missing.stderr, missing.stderr

    # ... and renders with the app's own React once the app has it: React, React DOM and
    # Scheduler packed from web/node_modules, so this works offline too.
    local = [
        ok(run(["npm", "pack", "--silent", str(WEB / "node_modules" / name)], cwd=project)).strip()
        for name in ("scheduler", "react", "react-dom")
    ]
    ok(
        run(
            ["npm", "install", "--offline", "--no-audit", "--no-fund", *(f"./{name}" for name in local)],
            cwd=project,
        )
    )
    rendered = node_eval(
        project,
        """
        const { createElement } = await import('react');
        const { renderToString } = await import('react-dom/server');
        const { ProgressProvider, ProgressTracker, useGenerationProgress } = await import('@phasecast/client/react');
        const { ProgressClient } = await import('@phasecast/client');
        const client = new ProgressClient({ baseUrl: 'http://127.0.0.1:9', transports: ['polling'] });
        const html = renderToString(createElement(ProgressProvider, { client },
          createElement(ProgressTracker, { jobId: 'comic-1', title: 'My comic' })));
        console.log(JSON.stringify({ hook: typeof useGenerationProgress, html }));
        """,
    )
    out = json.loads(ok(rendered))
    assert out["hook"] == "function"
    assert 'data-job-id="comic-1"' in out["html"] and "My comic" in out["html"], out["html"]


PAGE_SCRIPT = """
import { ProgressClient } from '@phasecast/client';

const log = (window.__reactFree = { states: [], transports: [], statuses: [], errors: [], tokens: 0, jobId: null, error: null });
const query = new URLSearchParams(location.search);
if (query.has('job')) {
  // Token refresh mode: watch a given job with a token function that fetches a short-lived
  // token every time it is asked.
  const jobId = query.get('job');
  const client = new ProgressClient({
    token: async () => {
      log.tokens += 1;
      return (await fetch('./token', { cache: 'no-store' })).text();
    },
  });
  client.onConnectionChange(() => {
    const info = client.getConnection();
    log.statuses.push(info.status);
    if (info.error) log.errors.push(info.error.message);
  });
  client.subscribe(jobId, () => {
    const { state } = client.getJob(jobId);
    if (state) log.states.push({ seq: state.seq, phase: state.phase, transport: client.getConnection().transport });
  });
  log.jobId = jobId;
} else try {
  const config = await (await fetch('/v1/demo/config')).json();
  const created = await fetch('/v1/demo/generations', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${config.token}` },
    body: JSON.stringify({ panels: 3 }),
  });
  const { job_id: jobId } = await created.json();
  const client = new ProgressClient({ token: config.token });
  client.onConnectionChange(() => log.transports.push(client.getConnection().transport));
  client.subscribe(jobId, () => {
    const { state } = client.getJob(jobId);
    if (state) log.states.push({ seq: state.seq, phase: state.phase, transport: client.getConnection().transport });
    document.body.textContent = `${state?.phase} ${state?.progress}`;
  });
  log.jobId = jobId;
} catch (error) {
  log.error = String(error);
}
"""


@pytest.fixture
def react_free_bundle(tarball: Path, tmp_path: Path) -> dict[str, bytes]:
    """The built page of a React-free app, file name -> bytes."""
    project = new_project(tmp_path / "plain-app", tarball)
    assert not (project / "node_modules" / "react").exists()
    (project / "main.js").write_text(PAGE_SCRIPT)
    (project / "index.html").write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>no React</title></head>'
        '<body><script type="module" src="./main.js"></script></body></html>'
    )
    # Vite from web/, run in the app's folder: its node_modules has @phasecast/client and no React.
    ok(
        run(
            ["node", str(VITE), "build", "--base", "./", "--outDir", "dist", "--logLevel", "warn"],
            cwd=project,
        )
    )
    dist = project / "dist"
    return {
        path.relative_to(dist).as_posix(): path.read_bytes() for path in dist.rglob("*") if path.is_file()
    }


@pytest.mark.browser
async def test_react_free_bundle_watches_a_job_in_chromium(
    page: Page, demo_server: DemoServer, react_free_bundle: dict[str, bytes]
) -> None:
    files = react_free_bundle
    bundle = b"".join(body for name, body in files.items() if name.endswith(".js")).decode()
    assert 'Symbol.for("react.' not in bundle and "react.element" not in bundle, (
        "React ended up in the bundle"
    )
    assert "/v1/ws" in bundle

    # Served from the demo server's origin (same-origin fetches and WebSocket, as a real app).
    prefix = f"{demo_server.url}/react-free/"

    async def serve(route: Route) -> None:
        name = route.request.url.removeprefix(prefix).split("?")[0]
        assert name in files, f"the page asked for {route.request.url}, which the bundle does not have"
        kind = "text/javascript" if name.endswith(".js") else "text/html"
        await route.fulfill(body=files[name], content_type=kind)

    await page.route(f"{prefix}**", serve)
    await page.goto(f"{prefix}index.html")
    await page.wait_for_function("() => window.__reactFree?.jobId || window.__reactFree?.error")
    assert await page.evaluate("window.__reactFree.error") is None
    job_id = await page.evaluate("window.__reactFree.jobId")
    await page.wait_for_function(
        "() => window.__reactFree.states.some((s) => s.phase === 'COMPLETE')", timeout=60_000
    )
    states: list[dict[str, Any]] = await page.evaluate("window.__reactFree.states")
    for before, after in itertools.pairwise(states):
        assert after["seq"] > before["seq"], states
        assert PIPELINE.index(after["phase"]) >= PIPELINE.index(before["phase"]), states
    assert states[-1]["seq"] == demo_server.job(job_id)["seq"]
    assert {state["transport"] for state in states} == {"websocket"}, states


# Every WebSocket the page opens and every frame it sends, recorded in the page.
RECORD_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.__sent = [];
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      window.__sockets.push(String(url));
    }
    send(data) {
      window.__sent.push(String(data));
      super.send(data);
    }
  };
})();
"""


@pytest.mark.browser
async def test_token_function_refreshes_before_expiry_on_one_socket(
    page: Page, slow_demo_server: DemoServer, react_free_bundle: dict[str, bytes]
) -> None:
    """Tokens that live 5 s, a job that runs longer: the page's token function is asked
    before each expiry and the fresh token goes over the open socket (`{"op":"auth"}`), so
    the server never closes it with 4401 and the viewer sees no interruption."""
    server = slow_demo_server
    files = react_free_bundle
    prefix = f"{server.url}/react-free/"
    minted: list[float] = []

    async def serve(route: Route) -> None:
        name = route.request.url.removeprefix(prefix).split("?")[0]
        if name == "token":
            now = time.time()
            minted.append(now)
            claims = {"sub": "demo", "scope": "jobs:read", "iat": int(now), "exp": int(now) + 5}
            await route.fulfill(body=jwt.encode(claims, TEST_SECRET, "HS256"), content_type="text/plain")
            return
        assert name in files, route.request.url
        kind = "text/javascript" if name.endswith(".js") else "text/html"
        await route.fulfill(body=files[name], content_type=kind)

    await page.add_init_script(RECORD_SOCKETS)
    await page.route(f"{prefix}**", serve)
    async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {server.token()}"}) as client:
        response = await client.post(f"{server.url}/v1/demo/generations", json={"panels": 12})
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]

    started = time.time()
    await page.goto(f"{prefix}index.html?job={job_id}")
    await page.wait_for_function(
        "() => window.__reactFree.states.some((s) => ['COMPLETE', 'FAILED'].includes(s.phase))",
        timeout=90_000,
    )
    watched = time.time() - started
    states: list[dict[str, Any]] = await page.evaluate("window.__reactFree.states")
    statuses: list[str] = await page.evaluate("window.__reactFree.statuses")
    errors: list[str] = await page.evaluate("window.__reactFree.errors")
    sockets: list[str] = await page.evaluate("window.__sockets")
    auth_frames = [frame for frame in await page.evaluate("window.__sent") if '"op":"auth"' in frame]
    assert states[-1]["seq"] == server.job(job_id)["seq"]
    for before, after in itertools.pairwise(states):
        assert after["seq"] > before["seq"], states
    # The watch outlived the first token ...
    assert watched > 6, f"the job ended within one token's life ({watched:.1f} s): the test proves nothing"
    # ... on one socket, each fresh token sent over it before the old one ran out.
    assert len(sockets) == 1, (
        f"the page reconnected: {len(sockets)} sockets; statuses {statuses}; errors {errors}"
    )
    assert len(auth_frames) == len(minted) - 1 >= 1, (auth_frames, minted)
    assert "reconnecting" not in statuses and not errors, (statuses, errors)
    assert {state["transport"] for state in states} == {"websocket"}
    print(
        f"token refresh: {len(minted)} 5-s tokens over a {watched:.1f} s watch, {len(auth_frames)} auth frames, 1 socket"
    )
