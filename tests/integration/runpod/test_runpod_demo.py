"""``phasecast demo`` starts the RunPod simulator itself: panels submitted to it progress and
finish like real RunPod jobs, with no RunPod settings at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from runpod_helpers import Comic, assert_never_backwards, panel_inputs, panel_progress_seen
from tests.support.process import ServerProcess

pytestmark = pytest.mark.slow


async def test_the_demo_draws_panels_on_its_own_simulator(
    sqlite_engine_url: str, tmp_path: Path, comic_factory: Callable[[ServerProcess, str], Comic]
) -> None:
    server = ServerProcess(sqlite_engine_url, command="demo", args=["--no-auto-jobs", "--speed", "10"],
                           log_path=tmp_path / "demo.log")
    server.start()
    comic = comic_factory(server, "demo-comic")
    try:
        await comic.start(panel_inputs(3))
        generated = await comic.wait_generated()
        assert generated["phase"] == "POST_PROCESSING", generated
        assert_never_backwards(comic.states())
        assert panel_progress_seen(comic.states())
    finally:
        await comic.close()
        server.stop()
