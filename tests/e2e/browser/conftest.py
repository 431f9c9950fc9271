"""Fixtures for the browser end-to-end tests: the demo server and the machine's Chromium
driven by Playwright (see browser_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from browser_support import ARTIFACTS, CHROMIUM_ARGS, STATIC_INDEX, WATCH_BARS, DemoServer, find_chromium
from playwright.async_api import Browser, BrowserContext, Page, async_playwright


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "Chromium is not installed (apt-get install -y chromium); Playwright cannot download browsers here"
        )
    if not STATIC_INDEX.exists():
        pytest.fail(
            f"The demo page is not built ({STATIC_INDEX} is missing): run `npm ci --engine-strict && npm run build` in web/"
        )
    return path


def _server(tmp_path: Path, speed: float, request: pytest.FixtureRequest) -> Iterator[DemoServer]:
    server = DemoServer(tmp_path, speed=speed)
    try:
        # Inside the try: a server that does not get ready in time is still stopped.
        server.start()
        yield server
    finally:
        server.stop()
        # Keep each test's server log as an artifact: CI failures are read from there.
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"server-{request.node.name}.log").write_text(server.log())


@pytest.fixture
def demo_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DemoServer]:
    """A demo server whose generations take about 7 s (speed 4)."""
    yield from _server(tmp_path, 4.0, request)


@pytest.fixture
def slow_demo_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DemoServer]:
    """About 20 s per generation (speed 1.5): long enough to break the network mid-way."""
    yield from _server(tmp_path, 1.5, request)


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        found = await playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield found
        finally:
            await found.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
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
