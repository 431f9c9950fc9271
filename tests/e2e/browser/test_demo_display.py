"""What the demo page shows, frame by frame and at phone and desktop widths.

An init script records every distinct rendering of every tracker (heading, phase label,
percent, message, notices) as React commits it, so a test can assert that something was
*never* on screen, not only that the final picture is right. The layout test screenshots
the page at 390 px and 1280 px and asserts that nothing overflows horizontally.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from browser_support import ARTIFACTS, FAST_RECOVERY, DemoServer
from playwright.async_api import Browser, Page
from test_demo_page import open_demo, start_generation, wait_phase

pytestmark = pytest.mark.browser

RECORD_FRAMES = """
(() => {
  window.__frames = {};
  const text = (root, selector) => root.querySelector(selector)?.textContent ?? null;
  const snap = () => {
    for (const tracker of document.querySelectorAll('.pc-tracker[data-job-id]')) {
      const frame = {
        title: text(tracker, '.pc-tracker__title'),
        phaseLabel: text(tracker, '.pc-tracker__phase'),
        phase: tracker.dataset.phase,
        percent: tracker.querySelector('[aria-label="Overall progress"]')?.getAttribute('aria-valuenow'),
        summary: text(tracker, '.pc-tracker__summary'),
        message: text(tracker, '.pc-tracker__message'),
        problem: text(tracker, '.pc-tracker__problem'),
        cancelled: text(tracker, '.pc-tracker__cancelled'),
        text: tracker.textContent,
      };
      const frames = (window.__frames[tracker.dataset.jobId] ??= []);
      const last = frames[frames.length - 1];
      if (!last || JSON.stringify(last) !== JSON.stringify(frame)) frames.push(frame);
    }
  };
  new MutationObserver(snap).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
})();
"""

# Every element of the page must end inside the viewport, and every element of the
# connection panel inside the panel (its own scrollWidth no wider than its box).
OVERFLOW = """
() => {
  const doc = document.documentElement;
  const width = doc.clientWidth;
  const outside = [];
  for (const el of document.body.querySelectorAll('*')) {
    const rect = el.getBoundingClientRect();
    if (rect.width <= 1) continue; // visually hidden helpers
    if (rect.right > width + 0.5 || rect.left < -0.5) outside.push(`${el.tagName}.${el.className}: ${rect.left}-${rect.right} > ${width}`);
  }
  const panel = document.querySelector('.demo__connection');
  const box = panel.getBoundingClientRect();
  const panelOverflow = [];
  for (const el of [panel, ...panel.querySelectorAll('*')]) {
    const rect = el.getBoundingClientRect();
    if (el.scrollWidth > el.clientWidth + 0.5 && el.clientWidth > 0) panelOverflow.push(`${el.tagName} scrollWidth ${el.scrollWidth} > ${el.clientWidth}`);
    if (rect.right > box.right + 0.5) panelOverflow.push(`${el.tagName} "${el.textContent.slice(0, 30)}" ends at ${rect.right} > ${box.right}`);
  }
  return { scrollWidth: doc.scrollWidth, clientWidth: width, outside, panelOverflow };
}
"""


@pytest.fixture
async def recorded_page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1100, "height": 1000}, reduced_motion="reduce")
    await context.add_init_script(RECORD_FRAMES)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def frames_of(page: Page, job_id: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = await page.evaluate("(id) => window.__frames[id] || []", job_id)
    assert frames, f"no rendering of {job_id} was recorded"
    return frames


async def test_new_job_after_an_idle_gap_shows_no_flash_and_never_100_before_complete(
    recorded_page: Page, demo_server: DemoServer
) -> None:
    page = recorded_page
    await open_demo(page, demo_server, query=FAST_RECOVERY)
    first = await start_generation(page, panels=2)
    await wait_phase(page, first, "COMPLETE")
    # Idle: nothing is watched, the link is closed.
    await page.wait_for_function("() => window.__phasecast.status === 'closed'")

    job_id = await start_generation(page, panels=3)
    await wait_phase(page, job_id, "COMPLETE")
    title = demo_server.job(job_id)["metadata"]["title"]
    frames = await frames_of(page, job_id)
    for frame in frames:
        assert frame["title"] == title, (
            f"the heading showed {frame['title']!r} before the title: {frames[:3]}"
        )
        assert frame["phase"], f"a frame without a phase: {frame}"
        assert frame["problem"] is None, f"a notice flashed: {frame}"
        assert "Waiting for the first update" not in frame["text"] and "Connecting" not in frame["text"], (
            frame
        )
        if frame["phase"] != "COMPLETE":
            assert frame["percent"] != "100" and not frame["summary"].startswith("100"), (
                f"100 % shown while {frame['phase']}: {frame}"
            )
    assert frames[-1]["percent"] == "100"
    # The server does report 100 before COMPLETE (POST_PROCESSING at phase_progress 100):
    # the display holds 99 until the job is complete.
    history = demo_server.history(job_id)
    if any(event["progress"] >= 99.5 and event["phase"] != "COMPLETE" for event in history):
        assert any(frame["percent"] == "99" for frame in frames), frames


async def test_a_cancelled_job_says_so_once(recorded_page: Page, demo_server: DemoServer) -> None:
    page = recorded_page
    await open_demo(page, demo_server, query=FAST_RECOVERY)
    job_id = await start_generation(page, panels=6)
    await wait_phase(page, job_id, "GENERATING")
    tracker = page.locator(f'[data-job-id="{job_id}"]')
    await tracker.get_by_role("button", name="Cancel").click()
    await wait_phase(page, job_id, "CANCELLED")
    reason = demo_server.job(job_id)["message"]
    frames = await frames_of(page, job_id)
    last = frames[-1]
    assert last["cancelled"] == reason, last
    assert last["message"] is None, f"the reason is shown twice: {last}"
    # The header's phase label, the one cancel line, and the phase row that stopped.
    assert last["text"].count("Cancel") == 2, last["text"]


@pytest.mark.parametrize("width", [390, 1280])
async def test_demo_page_fits_phone_and_desktop_widths(
    browser: Browser, demo_server: DemoServer, width: int
) -> None:
    context = await browser.new_context(viewport={"width": width, "height": 900}, reduced_motion="reduce")
    page = await context.new_page()
    try:
        await open_demo(page, demo_server, query=FAST_RECOVERY)
        running = await start_generation(page, panels=8)
        ended = await start_generation(page, panels=3)
        await page.locator(f'[data-job-id="{ended}"]').get_by_role("button", name="Cancel").click()
        await wait_phase(page, ended, "CANCELLED")
        await page.wait_for_function(
            """(id) => {
                const t = document.querySelector(`[data-job-id="${id}"]`);
                return t?.dataset.phase === 'GENERATING' && t.querySelectorAll('.pc-step [role=progressbar]').length === 8;
            }""",
            arg=running,
        )
        await page.wait_for_function(
            "() => document.querySelector('[data-testid=updates]').textContent !== '0'"
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"demo-{width}px.png"), full_page=True)
        layout = await page.evaluate(OVERFLOW)
        assert layout["scrollWidth"] <= layout["clientWidth"], layout
        assert not layout["outside"], layout["outside"]
        assert not layout["panelOverflow"], layout["panelOverflow"]
        # Every field of the connection panel is on screen, the engine included.
        engine = page.get_by_test_id("engine")
        assert await engine.is_visible()
        box = await engine.bounding_box()
        assert box is not None and box["x"] + box["width"] <= width, box
    finally:
        await context.close()
