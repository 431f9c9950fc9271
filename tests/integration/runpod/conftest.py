"""Fixtures for the RunPod integration tests: the simulator and a real server pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from runpod_helpers import Comic, runpod_env
from tests.support.process import ServerProcess

from phasecast.simulators.runpod import Faults, RunPodSimulator


@pytest.fixture
def sim() -> Iterator[RunPodSimulator]:
    # Webhook retries 0.3 s apart instead of RunPod's 10 s, to keep the suite quick.
    with RunPodSimulator(queue_delay=0.1, step_delay=0.1, steps=5,
                         faults=Faults(webhook_retry_delay=0.3)) as found:
        yield found


@pytest.fixture
def runpod_server(
    redis_engine_url: str, sim: RunPodSimulator, tmp_path: Path
) -> Iterator[ServerProcess]:
    server = ServerProcess(redis_engine_url, env=runpod_env(sim), log_path=tmp_path / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def comic_factory(
    make_token: Callable[..., str], worker_token: str
) -> Callable[[ServerProcess, str], Comic]:
    def make(server: ServerProcess, job_id: str) -> Comic:
        return Comic(server, worker_token, make_token("alice"), job_id)

    return make
