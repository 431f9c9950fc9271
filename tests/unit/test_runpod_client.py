"""The RunPod client against the local simulator, over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from phasecast.integrations.runpod import (
    RunPodClient,
    RunPodError,
    RunPodNotFound,
    RunPodRateLimited,
    output_progress,
)
from phasecast.simulators.runpod import Faults, RunPodSimulator


@pytest.fixture
def sim() -> Iterator[RunPodSimulator]:
    with RunPodSimulator(queue_delay=0.05, step_delay=0.05, steps=4,
                         faults=Faults(webhook_retry_delay=0.05)) as found:
        yield found


@pytest.fixture
async def client(sim: RunPodSimulator) -> AsyncIterator[RunPodClient]:
    found = RunPodClient(sim.base_url, sim.endpoint, sim.api_key, timeout=5)
    yield found
    await found.aclose()


async def wait_status(client: RunPodClient, runpod_id: str, wanted: set[str], timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (await client.status(runpod_id)).status
        if status in wanted:
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"{runpod_id} never reached {wanted}")


async def test_run_reports_progress_then_completes(client: RunPodClient) -> None:
    started = await client.run({"prompt": "a lighthouse"})
    assert started.status == "IN_QUEUE"
    seen: list[float] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status = await client.status(started.id)
        if status.status == "IN_PROGRESS" and (p := output_progress(status.output)) is not None:
            seen.append(p)
        if status.terminal:
            break
        await asyncio.sleep(0.01)
    assert status.status == "COMPLETED"
    assert status.output["image_url"].endswith(".png")
    assert status.execution_time_ms is not None
    assert seen, "no progress output was visible while IN_PROGRESS"
    assert all(0 < p < 100 for p in seen)


async def test_failed_job_carries_a_json_encoded_error_and_can_be_retried(client: RunPodClient) -> None:
    started = await client.run({"prompt": "x", "sim": {"fail_runs": 1}})
    assert await wait_status(client, started.id, {"COMPLETED", "FAILED"}) == "FAILED"
    failed = await client.status(started.id)
    assert json.loads(failed.error)["error_message"].startswith("CUDA out of memory")
    again = await client.retry(started.id)
    assert again.id == started.id
    assert await wait_status(client, started.id, {"COMPLETED", "FAILED"}) == "COMPLETED"
    assert (await client.status(started.id)).retries == 1


async def test_cancel_and_health(client: RunPodClient, sim: RunPodSimulator) -> None:
    started = await client.run({"prompt": "x", "sim": {"steps": 100}})
    await client.cancel(started.id)
    assert (await client.status(started.id)).status == "CANCELLED"
    assert started.id in sim.cancelled
    health = await client.health()
    assert "jobs" in health


async def test_unknown_job_is_not_found(client: RunPodClient, sim: RunPodSimulator) -> None:
    started = await client.run({"prompt": "x"})
    sim.expire(started.id)
    with pytest.raises(RunPodNotFound):
        await client.status(started.id)


async def test_rate_limit_blocks_the_client_until_retry_after(
    client: RunPodClient, sim: RunPodSimulator
) -> None:
    sim.faults.retry_after = 0.3
    sim.faults.rate_limit_next = 1
    with pytest.raises(RunPodRateLimited) as caught:
        await client.run({"prompt": "x"})
    assert caught.value.retry_after == pytest.approx(0.3)
    # Blocked locally: the next call does not even reach RunPod.
    before = sim.requests["POST /run"]
    with pytest.raises(RunPodRateLimited):
        await client.run({"prompt": "x"})
    assert sim.requests["POST /run"] == before
    await asyncio.sleep(0.35)
    assert (await client.run({"prompt": "x"})).status == "IN_QUEUE"


async def test_server_errors_and_bad_keys_are_clear(sim: RunPodSimulator, client: RunPodClient) -> None:
    sim.faults.error_next = 1
    with pytest.raises(RunPodError) as caught:
        await client.run({"prompt": "x"})
    assert caught.value.status == 500
    wrong = RunPodClient(sim.base_url, sim.endpoint, "wrong-key")
    try:
        with pytest.raises(RunPodError, match="API key"):
            await wrong.health()
    finally:
        await wrong.aclose()


async def test_webhook_is_retried_until_answered(sim: RunPodSimulator, client: RunPodClient) -> None:
    # The simulator itself answers 404 here: every attempt fails, and RunPod tries three times.
    dead = f"http://127.0.0.1:{sim.port}/nowhere"
    started = await client.run({"prompt": "x"}, webhook=dead)
    deadline = time.monotonic() + 5
    while len(sim.webhooks_for(started.id)) < 3:
        assert time.monotonic() < deadline, "the webhook was not attempted three times"
        await asyncio.sleep(0.02)
    attempts = sim.webhooks_for(started.id)
    assert [d.attempt for d in attempts] == [1, 2, 3]
    assert all(d.http_status == 404 for d in attempts)
