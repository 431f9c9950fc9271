"""RunPod under real conditions, against real servers and the simulator, on both engines:
polls that bring nothing new change nothing, the job's message counts panels, a ``/status``
404 is confirmed before a panel fails, a crash between ``/run`` and storing its answer leaves
no RunPod job running unobserved, and every malformed webhook gets its documented 4xx."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from runpod_helpers import (
    Comic,
    assert_never_backwards,
    done_transitions,
    eventually,
    eventually_async,
    panel_inputs,
    runpod_env,
)
from tests.support.process import TEST_SECRET, ServerProcess

from phasecast.engines import open_engine
from phasecast.integrations.runpod import derive_webhook_secret, webhook_url
from phasecast.simulators.runpod import RunPodSimulator
from phasecast.tracker import ProgressTracker

pytestmark = pytest.mark.slow

ComicFactory = Callable[[ServerProcess, str], Comic]
MESSAGE = re.compile(r"Drawing panels: (\d+) of (\d+) done")


def last(comic: Comic) -> dict[str, Any]:
    assert comic.watcher is not None
    return comic.watcher.states[comic.job_id][-1].state


async def test_panels_held_steady_over_many_polls_change_nothing(
    engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    sim.faults.drop_webhook = True  # only the poller reports: every change below is a poll's
    with ServerProcess(engine_url, env=runpod_env(sim), log_path=tmp_path / "server.log") as server:
        comic = comic_factory(server, "comic-steady")
        try:
            # Three panels that stop at 30, 50 and 70 % and stay there until resumed.
            await comic.start(panel_inputs(3, {1: {"steps": 10, "hold_at": 3}, 2: {"steps": 10, "hold_at": 5},
                                               3: {"steps": 10, "hold_at": 7}}))
            assert comic.watcher is not None
            held = {"panel-1": 30.0, "panel-2": 50.0, "panel-3": 70.0}
            await comic.watcher.wait_for(lambda w: {
                step: info["progress"] for step, info in last(comic)["steps"].items()} == held, 20)
            steady = last(comic)
            received = len(comic.states())
            history = (await comic.api.get("/v1/jobs/comic-steady/history")).json()
            polls = sim.requests["GET /status"]

            await eventually(lambda: sim.requests["GET /status"] >= polls + 60, 30, "60 more polls")

            now = (await comic.api.get("/v1/jobs/comic-steady")).json()
            assert now["seq"] == steady["seq"], "a poll that brought nothing new changed the job"
            assert (await comic.api.get("/v1/jobs/comic-steady/history")).json() == history
            assert len(comic.states()) == received, "a poll that brought nothing new was pushed"
            assert MESSAGE.fullmatch(now["message"]), now["message"]

            sim.resume()
            generated = await comic.wait_generated(timeout=30)
            assert generated["phase"] == "POST_PROCESSING", generated
            states = comic.states()
            assert_never_backwards(states)
            assert done_transitions(states) == {"panel-1": 1, "panel-2": 1, "panel-3": 1}
            # Stable and informative: the count of panels, never the name of the one last polled.
            drawing = [s["message"] for s in states if s["phase"] == "GENERATING"]
            assert all(MESSAGE.fullmatch(m) for m in drawing), drawing
            counts = [int(MESSAGE.fullmatch(m).group(1)) for m in drawing]  # type: ignore[union-attr]
            assert counts == sorted(counts) and counts[-1] == 3, counts
        finally:
            await comic.close()


async def test_a_passing_status_404_does_not_fail_the_panel(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    sim.faults.drop_webhook = True
    comic = comic_factory(runpod_server, "comic-404-blip")
    try:
        await comic.start(panel_inputs(2, {1: {"steps": 10, "hold_at": 5}, 2: {"steps": 10, "hold_at": 5}}))
        assert comic.watcher is not None
        # Both panels there and at 50 % (all() of no steps yet would be true at once).
        await comic.watcher.wait_for(lambda w: len(last(comic)["steps"]) == 2 and all(
            info["progress"] == 50 for info in last(comic)["steps"].values()), 20)
        sim.faults.not_found_next = 2  # two 404s, spread over the panels: not yet a confirmed loss
        await eventually(lambda: sim.requests["404"] >= 2, 10, "two 404s answered")
        sim.resume()
        generated = await comic.wait_generated(timeout=30)
        assert generated["phase"] == "POST_PROCESSING", generated
        assert (await comic.finish())["phase"] == "COMPLETE"
    finally:
        await comic.close()


async def test_a_lasting_status_404_fails_the_panel_only_once_confirmed(
    redis_engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    sim.faults.drop_webhook = True
    env = runpod_env(sim, PHASECAST_RUNPOD_NOT_FOUND_GRACE="1")
    with ServerProcess(redis_engine_url, env=env, log_path=tmp_path / "server.log") as server:
        comic = comic_factory(server, "comic-404")
        try:
            await comic.start(panel_inputs(1, {1: {"steps": 10, "hold_at": 5}}))
            assert comic.watcher is not None
            # (states from before the panel started have no steps yet)
            await comic.watcher.wait_for(
                lambda w: last(comic)["steps"].get("panel-1", {}).get("progress") == 50, 20
            )
            (runpod_id,) = sim.jobs
            sim.expire(runpod_id)  # RunPod forgot the job for good
            final = (await comic.watcher.wait_terminal("comic-404", 30)).state
            assert final["phase"] == "FAILED"
            assert "no longer knows" in final["error"]["message"]
            assert sim.requests["404"] >= 3, "the panel failed on fewer than three 404s"
        finally:
            await comic.close()


async def test_a_crash_between_run_and_storing_its_answer_orphans_no_runpod_job(
    engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    # /run starts each job but holds its answer: the server dies without learning any id.
    sim.faults.hold_run_answers = True
    # RunPod's webhook retries (10 s apart) outlast a restart; 5 s here.
    sim.faults.webhook_retry_delay = 5.0
    server = ServerProcess(engine_url, env=runpod_env(sim), log_path=tmp_path / "server.log")
    server.start()
    comic = comic_factory(server, "comic-orphans")
    try:
        await comic.start(panel_inputs(3, {n: {"steps": 25} for n in (1, 2, 3)}))
        await eventually(lambda: sim.held_runs == 3, 10, "three /run requests in flight")
        assert comic.watcher is not None
        before = last(comic)
        server.kill()  # SIGKILL between /run and storing its answer
        await comic.watcher.wait_closed()
        server.start()
        sim.release_runs()  # the answers go to a dead connection

        await comic.watch(since=before["seq"])
        generated = await comic.wait_generated(timeout=40)
        assert generated["phase"] == "POST_PROCESSING", generated
        final = await comic.finish()
        assert final["phase"] == "COMPLETE"

        # Exactly the three jobs submitted before the crash: adopted, none submitted twice,
        # none left running.
        assert len(sim.jobs) == 3, sorted(sim.jobs)
        assert sim.running() == []
        assert all(job.status == "COMPLETED" for job in sim.jobs.values())
        panels = (await comic.api.get("/v1/integrations/runpod/jobs/comic-orphans/panels")).json()["panels"]
        assert sorted(p["runpod_id"] for p in panels) == sorted(sim.jobs)
        assert all(p["status"] == "done" for p in panels)
        assert done_transitions(comic.states()) == {"panel-1": 1, "panel-2": 1, "panel-3": 1}
    finally:
        sim.release_runs()
        await comic.close()
        server.stop()


@contextlib.asynccontextmanager
async def run_in_flight(
    engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory, job_id: str,
    **env: str,
) -> AsyncIterator[tuple[ServerProcess, Comic]]:
    """A server and a one-panel comic whose /run RunPod has started but not answered yet.
    RunPod's job holds at step 5 of 10 until ``sim.resume()``: it can neither finish nor send
    its webhook before the test has done what it does meanwhile, however slow the machine."""
    sim.faults.hold_run_answers = True
    server = ServerProcess(engine_url, env=runpod_env(sim, **env), log_path=tmp_path / "server.log")
    server.start()
    comic = comic_factory(server, job_id)
    try:
        await comic.start(panel_inputs(1, {1: {"steps": 10, "hold_at": 5}}))
        await eventually(lambda: sim.held_runs == 1, 10, "the /run request in flight")
        yield server, comic
    finally:
        sim.release_runs()
        sim.resume()
        await comic.close()
        server.stop()


async def only_panel(comic: Comic) -> dict[str, Any]:
    (panel,) = (await comic.api.get(f"/v1/integrations/runpod/jobs/{comic.job_id}/panels")).json()["panels"]
    return dict(panel)


def webhook_delivered(sim: RunPodSimulator) -> bool:
    return any(d.http_status == 200 for d in sim.deliveries)


async def test_a_job_cancelled_while_a_submission_is_in_doubt_never_resubmits_it(
    sqlite_engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    """The other way out: the job is cancelled while /run's answer is lost. The panel is not
    submitted again, and when RunPod's job shows up (its webhook names the submission) it is
    not adopted into the cancelled panel."""
    async with run_in_flight(sqlite_engine_url, sim, tmp_path, comic_factory, "comic-doubt") as (server, comic):
        server.kill()
        assert comic.watcher is not None
        await comic.watcher.wait_closed()
        server.start()
        reply = await comic.api.post("/v1/jobs/comic-doubt/cancel", json={"reason": "no longer needed"})
        assert reply.status_code == 200
        sim.release_runs()  # the answer goes to the killed process: nobody reads it
        sim.resume()
        await eventually(lambda: webhook_delivered(sim), 20, "the webhook delivered")
        assert sim.running() == []
        assert len(sim.jobs) == 1
        panel = await only_panel(comic)
        assert panel["status"] == "cancelled" and panel["runpod_id"] is None, panel
        assert (await comic.api.get("/v1/jobs/comic-doubt")).json()["phase"] == "CANCELLED"


async def test_a_job_ended_elsewhere_never_takes_a_runpod_job_in_doubt(
    redis_engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    """An ended job's panels are stopped after the fact, by the process that stored the end.
    When that is not this instance (here a worker failed the job through its own tracker on the
    shared Redis while the instance was down), the panel still looks wanted when RunPod's job
    shows up; the job's own state decides, and the RunPod job is not adopted into it."""
    # The poller looks at the in-doubt panel only after three request timeouts: until then
    # only the webhook can touch it, so the test sees what the webhook path does.
    async with run_in_flight(redis_engine_url, sim, tmp_path, comic_factory, "comic-elsewhere",
                             PHASECAST_RUNPOD_REQUEST_TIMEOUT="20") as (server, comic):
        server.kill()
        async with ProgressTracker(open_engine(redis_engine_url)) as worker:
            await worker.fail("comic-elsewhere", "out_of_credit", "the customer ran out of credit")
        server.start()
        sim.release_runs()
        sim.resume()
        await eventually(lambda: webhook_delivered(sim), 20, "the webhook delivered")

        async def stopped() -> bool:
            return (await only_panel(comic))["status"] == "cancelled"

        # Only the webhook's handling stops the panel (the poller is not due yet).
        await eventually_async(stopped, 10, "the webhook handled")
        panel = await only_panel(comic)
        assert panel["runpod_id"] is None, panel
        assert len(sim.jobs) == 1
        assert (await comic.api.get("/v1/jobs/comic-elsewhere")).json()["phase"] == "FAILED"


async def test_a_run_answer_arriving_after_the_job_ended_elsewhere_is_cancelled_not_recorded(
    redis_engine_url: str, sim: RunPodSimulator, tmp_path: Path, comic_factory: ComicFactory
) -> None:
    """The live sibling of the case above: /run answers after a worker ended the job on the
    shared Redis (this instance stored no end, so it stopped nothing). The answer must not
    make the panel look started: the RunPod job is cancelled at once and not recorded."""
    async with run_in_flight(redis_engine_url, sim, tmp_path, comic_factory, "comic-late-answer") as (_, comic):
        async with ProgressTracker(open_engine(redis_engine_url)) as worker:
            await worker.cancel("comic-late-answer", "the reader closed the page")
        sim.release_runs()
        await eventually(lambda: len(sim.cancelled) == 1, 10, "the RunPod job cancelled")
        assert sim.cancelled == list(sim.jobs)
        panel = await only_panel(comic)
        assert panel["status"] == "cancelled" and panel["runpod_id"] is None, panel
        assert sim.requests["GET /status"] == 0  # nothing polled a job nobody wants


async def test_every_malformed_webhook_gets_its_documented_4xx(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    comic = comic_factory(runpod_server, "comic-hostile")
    try:
        await comic.start(panel_inputs(1, {1: {"steps": 400}}))
        await eventually(lambda: len(sim.jobs) == 1, 10, "the panel submitted")
        before = (await comic.api.get("/v1/jobs/comic-hostile")).json()
        (runpod_id,) = sim.jobs
        base = f"{runpod_server.url}/v1/integrations/runpod/webhook"
        genuine = webhook_url(runpod_server.url, derive_webhook_secret(TEST_SECRET) or "", "comic-hostile",
                              "panel-1")
        done = {"id": runpod_id, "status": "COMPLETED", "output": {"image_url": "https://x/y.png"}}
        token = genuine.split("token=")[1]
        forbidden: list[tuple[str, dict[str, str]]] = [
            ("non-ASCII token", {"job": "comic-hostile", "step": "panel-1", "token": "é" * 64}),
            ("astral token", {"job": "comic-hostile", "step": "panel-1", "token": "\U0001f600"}),
            ("long token", {"job": "comic-hostile", "step": "panel-1", "token": "a" * 5000}),
            ("no job", {"step": "panel-1", "token": token}),
            ("job with a newline", {"job": "comic-hostile\n", "step": "panel-1", "token": token}),
            ("non-ASCII job", {"job": "comic-hostilé", "step": "panel-1", "token": token}),
            ("step with a slash", {"job": "comic-hostile", "step": "panel/1", "token": token}),
            ("bad submission", {"job": "comic-hostile", "step": "panel-1", "token": token, "submission": "x"}),
        ]
        async with httpx.AsyncClient(timeout=10) as attacker:
            for what, params in forbidden:
                reply = await attacker.post(base, params=params, json=done)
                assert reply.status_code == 403, (what, reply.status_code, reply.text)
                assert reply.json()["error"]["code"] == "forbidden", what
            # A genuine URL with a parameter repeated: which value counts would depend on
            # the reader, so the URL is not one Phasecast issued.
            for extra in ("job=comic-hostile", "step=panel-1", "token=" + "0" * 64):
                reply = await attacker.post(f"{genuine}&{extra}", json=done)
                assert reply.status_code == 403, (extra, reply.status_code, reply.text)
            # A raw, undecodable query string.
            raw = await attacker.post(f"{base}?job=comic-hostile&step=panel-1&token=%FF%FE", json=done)
            assert raw.status_code == 403, raw.text

            invalid: list[tuple[str, bytes, int, str]] = [
                ("not JSON", b"{nope", 400, "invalid_json"),
                ("not UTF-8", b'{"id": "\xff"}', 400, "invalid_json"),
                ("NaN", b'{"id": "x", "status": "COMPLETED", "output": NaN}', 422, "invalid"),
                ("a key twice", b'{"id": "x", "status": "FAILED", "status": "COMPLETED"}', 422, "invalid"),
                ("lone surrogate", b'{"id": "x", "status": "COMPLETED", "output": "\\ud800"}', 422, "invalid"),
                ("deep nesting", b'{"id": "x", "status": "COMPLETED", "output": ' + b"[" * 100_000
                 + b"]" * 100_000 + b"}", 422, "invalid"),
                ("an array", b"[1, 2]", 422, "invalid"),
                ("id with a newline", b'{"id": "abc\\n", "status": "COMPLETED"}', 422, "invalid"),
                # Over the 1 MiB cap by less than the server drains before it answers, so the
                # client reads the 413 rather than a reset while it is still sending (far
                # larger bodies are refused as cheaply: tests/e2e/test_hostile_input.py).
                ("too large", b'{"id": "' + b"a" * (1024 * 1024 + 64 * 1024) + b'"}', 413, "too_large"),
            ]
            for what, body, status, code in invalid:
                async with httpx.AsyncClient(timeout=10) as fresh:
                    reply = await fresh.post(genuine, content=body, headers={"Content-Type": "application/json"})
                assert reply.status_code == status, (what, reply.status_code, reply.text)
                assert reply.json()["error"]["code"] == code, what

            # Chunked, so no Content-Length warns the server: 1.25 MiB, over the cap by
            # less than the server drains, so the whole body is read and the 413 arrives
            # (a body past the drain allowance is cut off mid-send, and its sender may see
            # the reset before the answer).
            async def chunked() -> Any:
                for _ in range(20):
                    yield b"[" * 65536

            streamed = await attacker.post(genuine, content=chunked())
            assert streamed.status_code == 413, streamed.text
        after = (await comic.api.get("/v1/jobs/comic-hostile")).json()
        assert after["steps"]["panel-1"]["status"] != "done"
        assert after["seq"] >= before["seq"]
        assert "Traceback" not in runpod_server.log()
        assert (await comic.api.post("/v1/jobs/comic-hostile/cancel", json={})).status_code == 200
    finally:
        await comic.close()


async def test_every_malformed_panel_submission_gets_its_documented_4xx_and_stores_nothing(
    runpod_server: ServerProcess, sim: RunPodSimulator, comic_factory: ComicFactory
) -> None:
    comic = comic_factory(runpod_server, "comic-bad-panels")
    path = "/v1/integrations/runpod/jobs/comic-bad-panels/panels"
    try:
        await comic.start_watching_only()
        created = await comic.api.post("/v1/jobs", json={"job_id": "comic-bad-panels", "owner": "alice"})
        assert created.status_code == 201, created.text
        json_type = {"Content-Type": "application/json"}
        cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
            ("no token", b"{not json", {**json_type, "Authorization": ""}, 401, "unauthorized"),
            ("not JSON", b"{nope", json_type, 400, "invalid_json"),
            ("not UTF-8", b'{"panels": [{"input": {"p": "\xff"}}]}', json_type, 400, "invalid_json"),
            ("a form", b"panels=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
             "unsupported_media_type"),
            ("NaN", b'{"panels": [{"input": {"seed": NaN}}]}', json_type, 422, "invalid"),
            ("a key twice", b'{"panels": [{"step": "p1", "step": "p2", "input": {}}]}', json_type, 422,
             "invalid"),
            ("lone surrogate", b'{"panels": [{"input": {"p": "\\ud800"}}]}', json_type, 422, "invalid"),
            ("deep nesting", b'{"panels": [{"input": {"p": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}]}",
             json_type, 422, "invalid"),
            ("step with a newline", b'{"panels": [{"step": "p\\n", "input": {}}]}', json_type, 422, "invalid"),
            ("no panels", b'{"panels": []}', json_type, 422, "invalid"),
        ]
        for what, body, headers, status, code in cases:
            reply = await comic.api.post(path, content=body, headers=headers)
            assert reply.status_code == status, (what, reply.status_code, reply.text)
            assert reply.json()["error"]["code"] == code, (what, reply.text)
        listed = await comic.api.get(path)
        assert listed.status_code == 200 and listed.json()["panels"] == [], listed.text
        assert sim.jobs == {}
        assert (await comic.api.get("/v1/jobs/comic-bad-panels")).json()["seq"] == 1
        assert "Traceback" not in runpod_server.log()
    finally:
        await comic.close()
