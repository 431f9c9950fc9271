"""A 6-panel comic on the RunPod simulator, through a real server on the Redis engine, under
each of RunPod's failure modes. A WebSocket watcher must see per-panel progress, never a step
backwards, each panel done exactly once, and the job COMPLETE (or FAILED as the policy says)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from runpod_helpers import (
    Comic,
    assert_never_backwards,
    done_transitions,
    eventually,
    panel_inputs,
    panel_progress_seen,
    slow_panels,
)
from tests.support.process import TEST_SECRET, ServerProcess

from phasecast.integrations.runpod import derive_webhook_secret, webhook_url
from phasecast.simulators.runpod import RunPodSimulator

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ComicFactory = Callable[[ServerProcess, str], Comic]
PANELS = [f"panel-{n}" for n in range(1, 7)]


async def run_to_completion(comic: Comic, **policy: Any) -> dict[str, Any]:
    await comic.start(panel_inputs(6), **policy)
    generated = await comic.wait_generated()
    assert generated["phase"] == "POST_PROCESSING", generated
    final = await comic.finish()
    assert final["phase"] == "COMPLETE"
    return final


def check_generation(comic: Comic) -> None:
    states = comic.states()
    assert_never_backwards(states)
    last_generating = [s for s in states if s["phase"] == "GENERATING"][-1]
    assert sorted(last_generating["steps"]) == PANELS
    assert last_generating["steps_total"] == 6
    assert done_transitions(states) == dict.fromkeys(PANELS, 1)
    seen = panel_progress_seen(states)
    assert len(seen) >= 4, f"per-panel progress was visible for only {sorted(seen)}"
    entered_post = [s for s in states if s["phase"] == "POST_PROCESSING"]
    assert entered_post and entered_post[0]["message"] == "All 6 panels drawn"


async def test_six_panels_complete_with_webhooks(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    comic = comic_factory(runpod_server, "comic-webhooks")
    try:
        await run_to_completion(comic)
        check_generation(comic)
        assert len(sim.jobs) == 6
        assert all(d.http_status == 200 for d in sim.deliveries)
        assert {d.job_id for d in sim.deliveries} == set(sim.jobs)
        panels = (await comic.api.get("/v1/integrations/runpod/jobs/comic-webhooks/panels")).json()
        assert [p["status"] for p in panels["panels"]] == ["done"] * 6
        assert all(p["output"]["image_url"].endswith(".png") for p in panels["panels"])
    finally:
        await comic.close()


async def test_dropped_webhooks_the_poller_completes_the_panels(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    sim.faults.drop_webhook = True
    comic = comic_factory(runpod_server, "comic-dropped")
    try:
        await run_to_completion(comic)
        check_generation(comic)
        assert sim.deliveries == []  # nothing but /status could have finished them
        assert sim.requests["GET /status"] >= 6
    finally:
        await comic.close()


async def test_duplicated_late_and_out_of_order_webhooks_change_nothing(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    sim.faults.duplicate_webhook = 2
    sim.faults.stale_webhook = True  # an IN_PROGRESS status at 20 % after the final one
    sim.faults.webhook_delay = 0.3
    comic = comic_factory(runpod_server, "comic-duplicates")
    try:
        await run_to_completion(comic)
        # Wait until every duplicate and stale webhook has been delivered and answered.
        await eventually(lambda: len(sim.deliveries) >= 6 * 4, what="24 webhook deliveries")
        assert len(sim.deliveries) == 6 * 4
        assert all(d.http_status == 200 for d in sim.deliveries)
        assert sum(d.status == "IN_PROGRESS" for d in sim.deliveries) == 6
        check_generation(comic)
        final = (await comic.api.get("/v1/jobs/comic-duplicates")).json()
        assert final["phase"] == "COMPLETE"
        assert final["seq"] == comic.states()[-1]["seq"]  # late webhooks made no change
    finally:
        await comic.close()


async def test_429_storms_and_server_errors_are_ridden_out(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    sim.faults.retry_after = 0.3
    sim.faults.rate_limit_next = 3  # the first submissions are refused
    comic = comic_factory(runpod_server, "comic-429")
    try:
        await comic.start(panel_inputs(6))
        await comic.wait_phase(("GENERATING",))
        sim.faults.storm(1.5)
        storm_started = sim.requests["429"]
        await asyncio.sleep(1.5)  # the storm's length, not synchronisation
        sim.faults.error_next = 4
        during_storm = sim.requests["429"] - storm_started
        generated = await comic.wait_generated()
        assert generated["phase"] == "POST_PROCESSING"
        final = await comic.finish()
        assert final["phase"] == "COMPLETE"
        check_generation(comic)
        assert sim.requests["429"] >= 4
        assert sim.requests["500"] == 4
        # Polling 6 panels every 0.1 s would hit RunPod ~90 times in 1.5 s; honouring
        # Retry-After (0.3 s) for the whole client keeps it to a handful.
        assert during_storm <= 20, during_storm
    finally:
        await comic.close()


async def test_a_failed_panel_fails_the_job_with_runpods_error(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    comic = comic_factory(runpod_server, "comic-fail")
    try:
        await comic.start(panel_inputs(6, {3: {"outcome": "FAILED", "steps": 1},
                                           5: {"steps": 200}}))
        final = await comic.wait_generated()
        assert final["phase"] == "FAILED"
        assert final["error"]["code"] == "torch.cuda.OutOfMemoryError"
        assert final["error"]["message"] == "panel-3: CUDA out of memory. Tried to allocate 2.00 GiB"
        assert final["steps"]["panel-3"]["status"] == "failed"
        assert_never_backwards(comic.states())
        # The panel still drawing is cancelled on RunPod.
        slow = next(j for j in sim.jobs.values() if j.input["seed"] == 5)
        await eventually(lambda: slow.status == "CANCELLED", what="cancelling the slow panel")
        assert slow.status == "CANCELLED"
        assert slow.id in sim.cancelled
    finally:
        await comic.close()


@pytest.mark.parametrize("retry_with", ["run", "retry"])
async def test_a_failed_panel_is_retried_by_policy(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory, retry_with: str
) -> None:
    comic = comic_factory(runpod_server, f"comic-retry-{retry_with}")
    try:
        await comic.start(panel_inputs(6, {2: {"fail_runs": 1}}), on_failure="retry",
                          max_retries=2, retry_with=retry_with)
        generated = await comic.wait_generated()
        assert generated["phase"] == "POST_PROCESSING", generated
        await comic.finish()
        states = comic.states()
        assert_never_backwards(states)
        retried = [s for s in states if "retrying" in s["message"]]
        assert retried, "the watcher never saw the failure and the retry"
        assert "panel-2 failed (CUDA out of memory" in retried[0]["message"]
        assert retried[0]["steps"]["panel-2"]["status"] == "failed"
        assert done_transitions(states) == dict.fromkeys(PANELS, 1)
        assert len(sim.jobs) == (7 if retry_with == "run" else 6)
        panels = (await comic.api.get(f"/v1/integrations/runpod/jobs/{comic.job_id}/panels")).json()
        second = next(p for p in panels["panels"] if p["step"] == "panel-2")
        assert second["attempt"] == 2 and second["status"] == "done"
    finally:
        await comic.close()


# What a RunPod worker may put in its error: a long traceback-like text, a NUL (which the
# PostgreSQL archive cannot hold), control characters, an error type that is no code at all.
HOSTILE_ERRORS = {
    "long": ("CUDA out of memory. " + "Tried to allocate 2.00 GiB; " * 200, "x" * 300),
    "nul": ("out of memory\x00 at step 3\x00", "torch.cuda.OutOfMemoryError"),
    "control": ("line one\nline two\r\n\x1b[31mred\x1b[0m\x7f", "<class 'RuntimeError'>"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ERRORS))
@pytest.mark.parametrize("policy", ["fail", "retry"])
async def test_any_runpod_error_text_fails_or_retries_the_job_with_a_storable_message(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory, case: str, policy: str
) -> None:
    """RunPod's error text is not ours: whatever its length or content, the panel's failure
    reaches the job (retried, or the job failed) with text every store and reader accepts."""
    text, kind = HOSTILE_ERRORS[case]
    sim.faults.error_message, sim.faults.error_type = text, kind
    comic = comic_factory(runpod_server, f"comic-error-{case}-{policy}")
    special = {"outcome": "FAILED", "steps": 1} if policy == "fail" else {"fail_runs": 1, "steps": 1}
    try:
        await comic.start(panel_inputs(2, {1: special}), on_failure=policy, max_retries=1)
        generated = await comic.wait_generated()
        if policy == "fail":
            assert generated["phase"] == "FAILED", generated
            error = generated["error"]
            assert error["message"].startswith("panel-1: "), error
            assert "\x00" not in error["message"] and len(error["message"]) <= 2000
            assert error["code"] and "\x00" not in error["code"] and len(error["code"]) <= 64
        else:
            assert generated["phase"] == "POST_PROCESSING", generated
            retried = [s for s in comic.states() if "retrying" in s["message"]]
            assert retried and retried[0]["message"].startswith("panel-1 failed ("), retried
            assert all("\x00" not in s["message"] and len(s["message"]) <= 500 for s in comic.states())
        assert_never_backwards(comic.states())
    finally:
        await comic.close()


@pytest.mark.parametrize(("outcome", "code"), [("TIMED_OUT", "runpod_timed_out"),
                                                ("NO_OUTPUT", "runpod_no_output")])
async def test_timed_out_and_completed_without_output_are_failures(
    runpod_server: ServerProcess, comic_factory: ComicFactory, outcome: str, code: str
) -> None:
    comic = comic_factory(runpod_server, f"comic-{outcome.lower()}")
    try:
        await comic.start(panel_inputs(6, {4: {"outcome": outcome}}))
        final = await comic.wait_generated()
        assert final["phase"] == "FAILED"
        assert final["error"]["code"] == code
        assert final["error"]["message"].startswith("panel-4: ")
    finally:
        await comic.close()


async def test_forged_and_malformed_webhooks_are_refused_and_change_nothing(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    comic = comic_factory(runpod_server, "comic-forged")
    try:
        await comic.start(panel_inputs(6, slow_panels(6)))
        await comic.wait_phase(("GENERATING",))
        await eventually(lambda: len(sim.jobs) == 6, 10, "six panels submitted")
        before = (await comic.api.get("/v1/jobs/comic-forged")).json()
        runpod_id = next(iter(sim.jobs))
        completed = {"id": runpod_id, "status": "COMPLETED", "output": {"image_url": "https://evil/x.png"}}
        base = f"{runpod_server.url}/v1/integrations/runpod/webhook"
        async with httpx.AsyncClient() as attacker:
            forged = await attacker.post(base, params={"job": "comic-forged", "step": "panel-1",
                                                       "token": "0" * 64}, json=completed)
            assert forged.status_code == 403
            assert "not match" in forged.json()["error"]["message"]
            unsigned = await attacker.post(base, params={"job": "comic-forged", "step": "panel-1"},
                                           json=completed)
            assert unsigned.status_code == 403
            # A genuine URL for another panel does not open this one.
            other = webhook_url(runpod_server.url, derive_webhook_secret(TEST_SECRET) or "",
                                "comic-forged", "panel-2")
            swapped = await attacker.post(other.replace("step=panel-2", "step=panel-1"), json=completed)
            assert swapped.status_code == 403
            # A genuine URL with a body that is not RunPod's: 422 naming the problem.
            genuine = webhook_url(runpod_server.url, derive_webhook_secret(TEST_SECRET) or "",
                                  "comic-forged", "panel-1")
            bad = await attacker.post(genuine, json={"id": runpod_id, "status": "FINISHED"})
            assert bad.status_code == 422
            assert bad.json()["error"]["field"] == "status"
            not_json = await attacker.post(genuine, content=b"{nope",
                                           headers={"Content-Type": "application/json"})
            assert not_json.status_code == 400
            # A genuine URL but a RunPod job that is not this panel's: accepted, ignored.
            foreign = await attacker.post(genuine, json={**completed, "id": "someone-elses-job"})
            assert foreign.status_code == 200
        after = (await comic.api.get("/v1/jobs/comic-forged")).json()
        assert after["steps"]["panel-1"]["status"] != "done"
        assert after["phase"] == "GENERATING"
        assert after["steps"]["panel-1"]["progress"] < 100
        assert after["seq"] >= before["seq"]
        assert all(s["steps"].get("panel-1", {}).get("status") != "done" for s in comic.states())
        cancel = await comic.api.post("/v1/jobs/comic-forged/cancel", json={"reason": "test over"})
        assert cancel.status_code == 200
    finally:
        await comic.close()


async def test_cancelling_the_job_cancels_its_runpod_jobs(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    comic = comic_factory(runpod_server, "comic-cancel")
    try:
        await comic.start(panel_inputs(6, slow_panels(6)))
        assert comic.watcher is not None
        await comic.watcher.wait_for(lambda w: any(
            s["progress"] > 0 and s["status"] == "running"
            for s in w.states["comic-cancel"][-1].state["steps"].values()), 15)
        # The viewer (the job's owner) cancels, not the worker.
        reply = await comic.api.post(
            "/v1/jobs/comic-cancel/cancel",
            headers={"Authorization": f"Bearer {comic.viewer_token}"}, json={"reason": "changed my mind"},
        )
        assert reply.status_code == 200
        await eventually(lambda: len(sim.cancelled) >= 6, what="six RunPod cancellations")
        assert sorted(sim.cancelled) == sorted(sim.jobs)
        assert all(job.status == "CANCELLED" for job in sim.jobs.values())
        final = (await comic.watcher.wait_terminal("comic-cancel")).state
        assert final["phase"] == "CANCELLED"
    finally:
        await comic.close()
