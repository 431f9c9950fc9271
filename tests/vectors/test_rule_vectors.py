"""The rules are written once: the Python model is the specification, and every engine's
atomic step (the Lua script on Redis, the transaction on SQLite) gives the same answers,
byte for byte, on the vectors of ``rules.json`` (see ``generate.py``)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests.vectors.generate import VECTORS, decide, generate, stats_of, update_of, weights_of

from phasecast.engines import Engine
from phasecast.engines.base import Decided, Ending, OtherJob, RuleInputs, history_entry
from phasecast.engines.redis import RedisEngine
from phasecast.errors import InvalidUpdate, JobNotFound, JobTerminal
from phasecast.model import DEFAULT_MESSAGE, MAX_WORKING_PROGRESS, JobState, Phase, ProgressUpdate

ERRORS: dict[str, type[Exception]] = {
    "JobTerminal": JobTerminal,
    "InvalidUpdate": InvalidUpdate,
    "JobNotFound": JobNotFound,
}


def load_vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS.read_text())
    return vectors


def test_the_vectors_cover_every_kind_of_answer() -> None:
    answers = {v["expected"].get("error") or v["expected"]["applied"] for v in load_vectors()}
    assert answers == {True, False, "JobTerminal", "InvalidUpdate"}
    endings = [v for v in load_vectors() if "end" in v["update"]]
    assert {v["expected"].get("error") or v["expected"]["applied"] for v in endings} == {
        True, False, "JobTerminal"
    }


def test_the_model_gives_every_answer_of_the_vectors() -> None:
    for vector in load_vectors():
        answer = decide(
            JobState.from_json(vector["prior"]),
            update_of(vector["update"]),
            datetime.fromisoformat(vector["now"]),
            weights_of(vector["weights"]),
            stats_of(vector["stats"]),
        )
        assert answer == vector["expected"], vector["name"]


def test_the_vectors_file_is_what_the_generator_writes() -> None:
    assert generate() == load_vectors(), "regenerate: python -m tests.vectors.generate"


def test_no_vector_reaches_100_before_complete() -> None:
    """Every answer the engines are held to: a job that has not completed is below 100 overall
    (unless it was stored at 100 before this rule: progress never goes back), and
    COMPLETE is 100."""
    seen = {"capped": 0, "complete": 0}
    for vector in load_vectors():
        if "state" not in vector["expected"] or not vector["expected"]["applied"]:
            continue
        prior, state = json.loads(vector["prior"]), json.loads(vector["expected"]["state"])
        if state["phase"] == "COMPLETE":
            assert state["progress"] == 100.0, vector["name"]
            seen["complete"] += 1
        elif prior["progress"] < 100:
            assert state["progress"] <= MAX_WORKING_PROGRESS, vector["name"]
            seen["capped"] += state["progress"] == MAX_WORKING_PROGRESS
    assert seen["capped"] >= 5 and seen["complete"] >= 5, seen


def test_entering_a_phase_never_carries_the_last_message_over() -> None:
    """Every vector that moves a job into a new working phase: the message is the report's
    own, or the phase's default."""
    entered = 0
    for vector in load_vectors():
        if "end" in vector["update"] or not vector["expected"].get("applied"):
            continue
        prior, state = json.loads(vector["prior"]), json.loads(vector["expected"]["state"])
        if state["phase"] == prior["phase"]:
            continue
        want = vector["update"].get("message", DEFAULT_MESSAGE[Phase(state["phase"])])
        assert state["message"] == want, vector["name"]
        entered += "message" not in vector["update"]
    assert entered >= 10, entered


def _renamed(text: str, old: str, new: str) -> str:
    prefix = '{"job_id":' + json.dumps(old)
    assert text.startswith(prefix)
    return '{"job_id":' + json.dumps(new) + text[len(prefix):]


async def _no_fallback(*args: Any) -> Decided:
    raise AssertionError("the atomic step handed a vector to the Python fallback")


async def step(
    engine: Engine, job_id: str, change: ProgressUpdate | Ending, now: datetime, inputs: RuleInputs
) -> Decided | OtherJob:
    if isinstance(change, Ending):
        return await engine.end(job_id, change, now, inputs)
    return await engine.apply(job_id, change, now, inputs)


async def test_every_engine_step_gives_every_answer_of_the_vectors(engine: Engine) -> None:
    # The fallback exists for states the script cannot reproduce; no vector may need it.
    engine.apply_by_compare_and_set = _no_fallback  # type: ignore[method-assign]
    engine.end_by_compare_and_set = _no_fallback  # type: ignore[method-assign]
    for index, vector in enumerate(load_vectors()):
        prior = JobState.from_json(vector["prior"])
        job_id = f"v{index}-{prior.job_id}"
        prior.job_id = job_id
        await engine.insert(prior)
        inputs = RuleInputs(
            prior.kind, prior.owner, weights_of(vector["weights"]), stats_of(vector["stats"])
        )
        now = datetime.fromisoformat(vector["now"])
        expected = vector["expected"]
        if "error" in expected:
            with pytest.raises(ERRORS[expected["error"]]):
                await step(engine, job_id, update_of(vector["update"]), now, inputs)
            assert await engine.load(job_id) == prior, vector["name"]
            continue
        decided = await step(engine, job_id, update_of(vector["update"]), now, inputs)
        want = _renamed(expected["state"], JobState.from_json(vector["prior"]).job_id, job_id)
        assert decided == Decided(expected["applied"], want), vector["name"]
        stored = await engine.load(job_id)
        assert stored is not None and stored.to_json() == want, vector["name"]
        history = await engine.history(job_id, limit=1)
        assert history[-1] == history_entry(stored), vector["name"]


@pytest.mark.redis
async def test_redis_stores_the_exact_bytes_python_would(redis_engine_url: str) -> None:
    engine = RedisEngine(redis_engine_url)
    await engine.start()
    try:
        for index, vector in enumerate(load_vectors()):
            if not vector["expected"].get("applied"):
                continue
            prior = JobState.from_json(vector["prior"])
            prior.job_id = f"b{index}"
            await engine.insert(prior)
            inputs = RuleInputs(
                prior.kind, prior.owner, weights_of(vector["weights"]), stats_of(vector["stats"])
            )
            await step(
                engine, prior.job_id, update_of(vector["update"]), datetime.fromisoformat(vector["now"]),
                inputs,
            )
            raw = await engine.client.hget(engine.keys.job(prior.job_id), "state")
            want = _renamed(vector["expected"]["state"], JobState.from_json(vector["prior"]).job_id,
                            prior.job_id)
            assert raw == want, vector["name"]
            assert json.loads(raw) == json.loads(want)
    finally:
        await engine.stop()


@pytest.mark.redis
async def test_a_state_the_script_cannot_reproduce_is_decided_by_the_python_rules(
    redis_engine_url: str,
) -> None:
    vector = next(v for v in load_vectors() if v["expected"].get("applied") and "end" not in v["update"])
    prior = JobState.from_json(vector["prior"])
    engine = RedisEngine(redis_engine_url)
    await engine.start()
    try:
        await engine.insert(prior)
        # As an older writer might have stored it: same values, other key order and spacing.
        reordered = json.dumps(dict(reversed(list(prior.to_dict().items()))), indent=2)
        async with aioredis.Redis.from_url(redis_engine_url.split("?")[0]) as client:
            await client.hset(engine.keys.job(prior.job_id), "state", reordered)
        inputs = RuleInputs(
            prior.kind, prior.owner, weights_of(vector["weights"]), stats_of(vector["stats"])
        )
        decided = await step(
            engine, prior.job_id, update_of(vector["update"]), datetime.fromisoformat(vector["now"]),
            inputs,
        )
        assert decided == Decided(True, vector["expected"]["state"])
        # And an ending of such a state too.
        await client_hset(redis_engine_url, engine, prior.job_id)
        ended = await engine.end(prior.job_id, Ending(Phase.CANCELLED, "stop"), datetime.fromisoformat(vector["now"]),
                                 inputs)
        assert isinstance(ended, Decided) and ended.applied
        assert JobState.from_json(ended.state_json).phase is Phase.CANCELLED
    finally:
        await engine.stop()


async def client_hset(url: str, engine: RedisEngine, job_id: str) -> None:
    """Store the job's state again with its keys reversed (a shape the script leaves alone)."""
    state = await engine.load(job_id)
    assert state is not None
    async with aioredis.Redis.from_url(url.split("?")[0]) as client:
        await client.hset(engine.keys.job(job_id), "state",
                          json.dumps(dict(reversed(list(state.to_dict().items())))))


def test_messages_are_sent_to_the_script_as_json_dumps_writes_them() -> None:
    """The Redis engine quotes a plain message itself instead of calling json.dumps; the
    script stores what it is sent, so the two must agree on every string."""
    import random

    from phasecast.engines.redis import _json_string

    rng = random.Random(10)
    samples = ["", "plain", 'a"b', "a\\b", "x\x00y", "tab\t", "nl\n", "ü ✓ 😀", "\x7f", "\u2028",
               "\ud800", "</script>"]
    for _ in range(5000):
        samples.append("".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0, 0x3000)]))
                               for _ in range(rng.randint(0, 12))))
    for text in samples:
        assert _json_string(text) == json.dumps(text, ensure_ascii=False), repr(text)
