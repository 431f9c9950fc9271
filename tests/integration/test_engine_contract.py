"""One contract, every engine: the ``engine`` fixture runs each test on SQLite and on Redis."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from tests.conftest import ENGINE_URL_FIXTURES
from tests.support.process import PrivateRedis, free_port

from phasecast.engines import ChangeFeed, Engine, JobStore, open_engine
from phasecast.engines.base import Change, Decided, OtherJob, RuleInputs
from phasecast.engines.redis import RedisEngine
from phasecast.errors import (
    ConfigurationError,
    EngineUnavailable,
    JobExists,
    JobNotFound,
    JobTerminal,
)
from phasecast.model import (
    JobState,
    Phase,
    ProgressUpdate,
    apply_progress,
    apply_terminal,
    new_job,
    utc_now,
)
from phasecast.progress import COMIC_WEIGHTS
from phasecast.tracker import ProgressTracker


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
        pytest.param("sentinel", marks=pytest.mark.redis),
    ]
)
def engine_url(request: pytest.FixtureRequest) -> str:
    """Here the contract also runs through Redis Sentinel (a primary and a replica behind
    three sentinels), besides conftest's engines."""
    url: str = request.getfixturevalue(ENGINE_URL_FIXTURES[request.param])
    return url


def make(job_id: str = "job-1", owner: str = "alice") -> JobState:
    return new_job(job_id=job_id, owner=owner, kind="comic", metadata={"n": 1}, now=utc_now())


def step(state: JobState, progress: float) -> JobState:
    update = ProgressUpdate(Phase.ANALYZING, phase_progress=progress)
    later = utc_now() + timedelta(milliseconds=1)
    outcome = apply_progress(state, update, later, COMIC_WEIGHTS)
    assert outcome.applied
    return outcome.state


async def test_insert_then_load_returns_the_same_state(engine: Engine) -> None:
    state = make()
    await engine.insert(state)
    assert await engine.load("job-1") == state
    assert await engine.load("missing") is None


async def test_insert_refuses_a_taken_id(engine: Engine) -> None:
    await engine.insert(make())
    with pytest.raises(JobExists):
        await engine.insert(make())


async def test_replace_is_compare_and_set_on_seq(engine: Engine) -> None:
    first = make()
    await engine.insert(first)
    second = step(first, 10)
    assert await engine.replace(second, expected_seq=1)
    # A writer that computed from the old state loses and changes nothing.
    stale = step(first, 20)
    assert not await engine.replace(stale, expected_seq=1)
    stored = await engine.load("job-1")
    assert stored is not None and stored.seq == 2 and stored.phase_progress == 10


async def test_concurrent_writers_never_interleave(engine: Engine) -> None:
    base = make()
    await engine.insert(base)
    contenders = [step(base, float(p)) for p in range(1, 21)]
    results = await asyncio.gather(*(engine.replace(s, expected_seq=1) for s in contenders))
    assert sum(results) == 1
    stored = await engine.load("job-1")
    assert stored is not None and stored.seq == 2


async def test_list_filters_by_owner_and_activity_newest_first(engine: Engine) -> None:
    for index, owner in enumerate(["alice", "bob", "alice"]):
        await engine.insert(make(f"job-{index}", owner))
        await asyncio.sleep(0.002)  # distinct creation times, so the order is defined
    ended = await engine.load("job-0")
    assert ended is not None
    finished = ended.copy()
    finished.phase, finished.seq = Phase.COMPLETE, 2
    assert await engine.replace(finished, expected_seq=1)

    alice = [s.job_id for s in await engine.list_jobs("alice", active_only=False, limit=10)]
    assert alice == ["job-2", "job-0"]
    active = [s.job_id for s in await engine.list_jobs("alice", active_only=True, limit=10)]
    assert active == ["job-2"]
    everyone = await engine.list_jobs(None, active_only=False, limit=2)
    assert [s.job_id for s in everyone] == ["job-2", "job-1"]


async def test_history_keeps_each_change_in_order(engine: Engine) -> None:
    state = make()
    await engine.insert(state)
    for progress in (10, 20, 30):
        new = step(state, progress)
        assert await engine.replace(new, expected_seq=state.seq)
        state = new
    history = await engine.history("job-1", limit=10)
    assert [e["seq"] for e in history] == [1, 2, 3, 4]
    assert [e["phase_progress"] for e in history] == [0.0, 10.0, 20.0, 30.0]
    assert [e["seq"] for e in await engine.history("job-1", limit=2)] == [3, 4]


async def test_phase_durations_are_learned_per_kind(engine: Engine) -> None:
    assert await engine.load_stats("comic") == {}
    await engine.record_durations("comic", {Phase.ANALYZING: 10.0, Phase.GENERATING: 40.0})
    await engine.record_durations("comic", {Phase.ANALYZING: 20.0})
    stats = await engine.load_stats("comic")
    assert stats[Phase.ANALYZING].samples == 2
    assert stats[Phase.ANALYZING].mean_seconds == pytest.approx(13.0)
    assert stats[Phase.GENERATING].mean_seconds == pytest.approx(40.0)
    assert await engine.load_stats("video") == {}


async def test_listened_changes_are_delivered_once_each_in_order(engine_url: str) -> None:
    received: list[Change] = []
    arrived = asyncio.Event()

    def on_change(change: Change) -> None:
        received.append(change)
        if change.seq == 3:
            arrived.set()

    engine = open_engine(engine_url)
    await engine.start(on_change)
    try:
        await engine.listen("job-1")
        state = make()
        await engine.insert(state)
        for progress in (10, 20):
            new = step(state, progress)
            assert await engine.replace(new, expected_seq=state.seq)
            state = new
        await asyncio.wait_for(arrived.wait(), 5)
        mine = [c for c in received if c.job_id == "job-1"]
        assert [c.seq for c in mine] == [1, 2, 3]
        assert JobState.from_json(mine[-1].state_json) == state
    finally:
        await engine.stop()


def test_unknown_engine_urls_are_explained() -> None:
    with pytest.raises(ConfigurationError, match="unknown engine URL"):
        open_engine("mysql://localhost/x")
    with pytest.raises(ConfigurationError, match="names no file"):
        open_engine("sqlite://")


# --- what a replace may change: the same answer from every engine (issue 8, section 7) ----


def finish(state: JobState) -> JobState:
    outcome = apply_terminal(state, Phase.COMPLETE, utc_now() + timedelta(milliseconds=1))
    assert outcome.applied
    return outcome.state


async def test_replace_refuses_to_change_a_finished_job(engine: Engine) -> None:
    state = make()
    await engine.insert(state)
    done = finish(state)
    assert await engine.replace(done, expected_seq=1)
    # A writer that read the finished state and still computed a change from it.
    revived = done.copy()
    revived.phase, revived.phase_progress, revived.seq = Phase.GENERATING, 50.0, 3
    with pytest.raises(JobTerminal) as refused:
        await engine.replace(revived, expected_seq=2)
    assert refused.value.phase is Phase.COMPLETE
    assert await engine.load("job-1") == done
    assert [e["seq"] for e in await engine.history("job-1", limit=10)] == [1, 2]
    # A stale writer (its base is older than the ending) just loses, as on a live job.
    assert not await engine.replace(step(state, 10), expected_seq=1)


async def test_replace_must_move_seq_up_by_exactly_one(engine: Engine) -> None:
    state = make()
    await engine.insert(state)
    skipping = step(state, 10)
    skipping.seq = 5
    with pytest.raises(ValueError, match="must carry seq 2"):
        await engine.replace(skipping, expected_seq=1)
    assert await engine.load("job-1") == state


async def test_replace_of_a_missing_job_stores_nothing(engine: Engine) -> None:
    ghost = step(make("ghost"), 10)
    assert not await engine.replace(ghost, expected_seq=1)
    assert await engine.load("ghost") is None
    assert await engine.history("ghost", limit=10) == []


# --- listen either makes delivery sure or says it cannot ----------------------------------


async def test_listen_without_a_change_handler_is_refused(engine: Engine) -> None:
    # The ``engine`` fixture starts engines without ``on_change``: nothing could be delivered.
    with pytest.raises(EngineUnavailable, match="cannot be watched"):
        await engine.listen("job-1")


async def test_listen_on_a_stopped_engine_is_refused(engine_url: str) -> None:
    engine = open_engine(engine_url)
    await engine.start(lambda change: None)
    await engine.stop()
    with pytest.raises(EngineUnavailable):
        await engine.listen("job-1")


@pytest.mark.redis
async def test_listen_raises_when_the_change_feed_is_down_and_recovers_after() -> None:
    received: list[Change] = []
    delivered = asyncio.Event()

    def on_change(change: Change) -> None:
        received.append(change)
        delivered.set()

    with PrivateRedis() as server:
        engine = open_engine(server.url)
        assert isinstance(engine, RedisEngine)
        engine.subscribe_timeout = 1.0
        await engine.start(on_change)
        try:
            server.kill()
            with pytest.raises(EngineUnavailable, match="not confirmed"):
                await engine.listen("job-1")
            server.start()  # same port: the listener reconnects by itself
            engine.subscribe_timeout = 10.0  # longer than the capped reconnect backoff
            await engine.listen("job-1")
            await engine.insert(make())
            await asyncio.wait_for(delivered.wait(), 5)
            assert [c.seq for c in received if c.job_id == "job-1"] == [1]
        finally:
            await engine.stop()


@pytest.mark.redis
async def test_listen_waits_for_a_feed_that_comes_back_in_time() -> None:
    received: list[Change] = []
    delivered = asyncio.Event()

    def on_change(change: Change) -> None:
        if change.job_id == "job-1":
            received.append(change)
            delivered.set()

    with PrivateRedis() as server:
        engine = open_engine(server.url)
        assert isinstance(engine, RedisEngine)
        engine.subscribe_timeout = 8.0
        await engine.start(on_change)
        try:
            server.kill()
            listening = asyncio.create_task(engine.listen("job-1"))
            await asyncio.sleep(0.2)  # the listen is waiting for the link, not refused
            assert not listening.done()
            server.start()
            await listening
            await engine.insert(make())
            await asyncio.wait_for(delivered.wait(), 5)
            assert [c.seq for c in received] == [1]
        finally:
            await engine.stop()


@pytest.mark.redis
async def test_a_watch_refused_while_the_feed_is_down_leaves_nothing_behind() -> None:
    with PrivateRedis() as server:
        engine = open_engine(server.url)
        assert isinstance(engine, RedisEngine)
        engine.subscribe_timeout = 1.0
        async with ProgressTracker(engine) as tracker:
            await tracker.create(owner="alice", job_id="job-1")
            server.kill()
            with pytest.raises(EngineUnavailable):
                async with tracker.watch("job-1"):
                    pass
            assert tracker.hub.watched_jobs == 0  # the next watcher subscribes afresh
            engine.subscribe_timeout = 10.0  # longer than the capped reconnect backoff
            server.start()
            await tracker.create(owner="alice", job_id="job-1")  # the private Redis kept nothing
            async with tracker.watch("job-1") as states:
                seen = [(await anext(states)).seq]
                await tracker.report("job-1", Phase.ANALYZING, 10)
                seen.append((await anext(states)).seq)
            assert seen == [1, 2]


# --- the split: a store and a change feed, each keeping its own promises ------------------


def test_every_engine_is_a_store_and_a_change_feed(engine_url: str) -> None:
    engine = open_engine(engine_url)
    assert isinstance(engine, JobStore) and isinstance(engine, ChangeFeed)


async def test_what_a_write_returned_for_is_read_back_by_a_fresh_engine(engine_url: str) -> None:
    first = open_engine(engine_url)
    await first.start()
    state = make()
    await first.insert(state)
    changed = step(state, 40)
    assert await first.replace(changed, expected_seq=1)
    await first.stop()
    second = open_engine(engine_url)
    await second.start()
    try:
        assert await second.load("job-1") == changed
        assert [e["seq"] for e in await second.history("job-1", limit=10)] == [1, 2]
    finally:
        await second.stop()


async def test_history_keeps_at_least_its_limit_and_answers_the_newest(engine_url: str) -> None:
    kind = type(open_engine(engine_url))
    engine = kind(engine_url, history_limit=3)  # type: ignore[call-arg]
    await engine.start()
    try:
        state = make()
        await engine.insert(state)
        for progress in range(10, 80, 10):
            new = step(state, progress)
            assert await engine.replace(new, expected_seq=state.seq)
            state = new
        assert [e["seq"] for e in await engine.history("job-1", limit=3)] == [6, 7, 8]
        kept = [e["seq"] for e in await engine.history("job-1", limit=100)]
        assert kept[-3:] == [6, 7, 8] and kept == sorted(kept)  # Redis trims approximately
    finally:
        await engine.stop()


async def test_a_stopped_engine_says_it_is_unavailable(engine_url: str) -> None:
    engine = open_engine(engine_url)
    await engine.start()
    await engine.ping()
    await engine.stop()
    with pytest.raises(EngineUnavailable):
        await engine.ping()
    with pytest.raises(EngineUnavailable):
        await engine.load("job-1")


async def test_the_feed_delivers_again_after_unlisten_and_listen(engine_url: str) -> None:
    received: list[Change] = []
    arrived = asyncio.Event()

    def on_change(change: Change) -> None:
        if change.job_id == "job-1":
            received.append(change)
            arrived.set()

    engine = open_engine(engine_url)
    await engine.start(on_change)
    try:
        await engine.listen("job-1")
        state = make()
        await engine.insert(state)
        await asyncio.wait_for(arrived.wait(), 5)
        await engine.unlisten("job-1")
        await engine.listen("job-1")
        arrived.clear()
        new = step(state, 10)
        assert await engine.replace(new, expected_seq=1)
        while not received or received[-1].seq < 2:
            await asyncio.wait_for(arrived.wait(), 5)
            arrived.clear()
        assert [c.seq for c in received] == [1, 2]
        assert received[-1].state_json == new.to_json()
        assert JobState.from_json(received[-1].state_json) == await engine.load("job-1")
    finally:
        await engine.stop()


# --- apply: a report decided and stored in one atomic step --------------------------------


def inputs_for(state: JobState) -> RuleInputs:
    return RuleInputs(state.kind, state.owner, dict(COMIC_WEIGHTS), {})


async def test_apply_decides_stores_and_appends_history(engine: Engine) -> None:
    state = make()
    await engine.insert(state)
    update = ProgressUpdate(Phase.ANALYZING, phase_progress=40.0, message="reading")
    now = utc_now()
    decided = await engine.apply("job-1", update, now, inputs_for(state))
    assert isinstance(decided, Decided) and decided.applied
    expected = apply_progress(state, update, now, COMIC_WEIGHTS).state
    stored = await engine.load("job-1")
    assert stored is not None and decided.state_json == stored.to_json()
    assert (stored.seq, stored.phase, stored.progress, stored.message) == (
        2, Phase.ANALYZING, expected.progress, "reading"
    )
    assert [e["message"] for e in await engine.history("job-1", limit=10)] == ["Queued", "reading"]
    # The same report again changes nothing and says so.
    again = await engine.apply("job-1", update, utc_now(), inputs_for(state))
    assert again == Decided(False, decided.state_json)


async def test_batches_issued_while_others_are_unanswered_keep_each_jobs_order(
    engine: Engine,
) -> None:
    """Forty batches of the same two jobs, each issued in its own loop turn while earlier
    ones are still unanswered (on Redis, several pipelines are in flight at once): every
    report applies, in the order issued, so seq and progress only go up."""
    jobs = [make("job-1"), make("job-2")]
    for state in jobs:
        await engine.insert(state)
    inputs = inputs_for(jobs[0])
    tasks = []
    for n in range(1, 41):
        items = [(s.job_id, ProgressUpdate(Phase.ANALYZING, phase_progress=float(n)), inputs) for s in jobs]
        tasks.append(asyncio.create_task(engine.apply_many(items, utc_now())))
        await asyncio.sleep(0)  # the next batch comes in a later loop turn
    answers = await asyncio.gather(*tasks)
    for k, state in enumerate(jobs):
        decided = [batch[k] for batch in answers]
        assert all(isinstance(d, Decided) and d.applied for d in decided), decided
        assert [d.summary()[0] for d in decided if isinstance(d, Decided)] == list(range(2, 42))
        stored = await engine.load(state.job_id)
        assert stored is not None and (stored.seq, stored.phase_progress) == (41, 40.0)


async def test_one_turns_writes_of_many_jobs_apply_in_each_jobs_order(engine: Engine) -> None:
    """Four reports of each of 30 jobs, interleaved, issued in one loop turn (on Redis, one
    turn's writes go out as several pipelines at once, split by job): every report
    applies, and each job's in the order issued."""
    jobs = [make(f"job-{k}") for k in range(30)]
    for state in jobs:
        await engine.insert(state)
    inputs = inputs_for(jobs[0])
    calls = [
        engine.apply(s.job_id, ProgressUpdate(Phase.ANALYZING, phase_progress=float(n)), utc_now(), inputs)
        for n in range(1, 5)
        for s in jobs
    ]
    answers = await asyncio.gather(*calls)
    assert all(isinstance(d, Decided) and d.applied for d in answers), answers
    for k, state in enumerate(jobs):
        mine = [answers[n * len(jobs) + k] for n in range(4)]
        assert [d.summary()[0] for d in mine if isinstance(d, Decided)] == [2, 3, 4, 5]
        stored = await engine.load(state.job_id)
        assert stored is not None and (stored.seq, stored.phase_progress) == (5, 4.0)


def test_a_turns_writes_are_split_by_job_over_the_free_pipelines() -> None:
    """The split itself (Redis): each job's writes in one part, in their order; no more
    parts than pipelines free; small batches, and the writes of one job, whole."""
    from phasecast.engines import redis as redis_engine

    engine = redis_engine.RedisEngine("redis://127.0.0.1:1/0")

    def entry(job: str, n: int) -> tuple[object, list[str], list[object], object]:
        return (None, [f"pc:job:{{{job}}}"], [n], None)

    batch = [entry(f"j{k % 13}", k) for k in range(100)]
    parts = engine._split(batch)  # type: ignore[arg-type]
    assert len(parts) == redis_engine.MAX_PIPELINES
    assert sorted((e for part in parts for e in part), key=lambda e: e[2][0]) == batch
    for part in parts:
        assert len(part) >= redis_engine.MIN_PIPELINE
        assert [e[2][0] for e in part] == sorted(e[2][0] for e in part)
    homes = {e[1][0]: i for i, part in enumerate(parts) for e in part}
    assert len(homes) == 13 and all(
        sum(1 for part in parts if any(e[1][0] == key for e in part)) == 1 for key in homes
    )
    engine._pipelines = redis_engine.MAX_PIPELINES - 2
    assert len(engine._split(batch)) == 2  # type: ignore[arg-type]
    engine._pipelines = 0
    small = batch[: 2 * redis_engine.MIN_PIPELINE - 1]
    assert engine._split(small) == [small]  # type: ignore[arg-type]
    one_job = [entry("j0", k) for k in range(100)]
    assert engine._split(one_job) == [one_job]  # type: ignore[arg-type]


async def test_apply_asks_again_for_another_kind_or_owner(engine: Engine) -> None:
    state = make()
    await engine.insert(state)
    update = ProgressUpdate(Phase.ANALYZING, phase_progress=40.0)
    for kind, owner in (("video", "alice"), ("comic", "mallory"), ("comic", "")):
        wrong = RuleInputs(kind, owner, dict(COMIC_WEIGHTS), {})
        assert await engine.apply("job-1", update, utc_now(), wrong) == OtherJob("comic", "alice")
    assert await engine.load("job-1") == state


async def test_apply_refuses_what_the_rules_refuse(engine: Engine) -> None:
    with pytest.raises(JobNotFound):
        await engine.apply("nope", ProgressUpdate(Phase.ANALYZING), utc_now(), inputs_for(make()))
    state = make()
    await engine.insert(state)
    done = finish(state)
    assert await engine.replace(done, expected_seq=1)
    with pytest.raises(JobTerminal):
        await engine.apply("job-1", ProgressUpdate(Phase.ANALYZING, phase_progress=5.0), utc_now(),
                           inputs_for(state))
    assert await engine.load("job-1") == done


async def test_concurrent_reports_all_apply_without_retries(engine_url: str) -> None:
    # Two engines on one store where the engine allows it (Redis); one otherwise.
    engines = [open_engine(engine_url) for _ in range(2 if engine_url.startswith("redis") else 1)]
    for each in engines:
        await each.start()
    try:
        state = make()
        await engines[0].insert(state)
        reports = [ProgressUpdate(Phase.GENERATING, message=f"m{i}") for i in range(40)]
        results = await asyncio.gather(*(
            engines[i % len(engines)].apply("job-1", r, utc_now(), inputs_for(state))
            for i, r in enumerate(reports)
        ))
        assert all(isinstance(r, Decided) and r.applied for r in results)
        seqs = sorted(JobState.from_json(r.state_json).seq for r in results if isinstance(r, Decided))
        assert seqs == list(range(2, 42))  # each report got its own seq: none lost, none retried
        assert len(await engines[0].history("job-1", limit=100)) == 41
    finally:
        for each in engines:
            await each.stop()


async def test_an_applied_report_reaches_the_change_feed(engine_url: str) -> None:
    received: list[Change] = []
    arrived = asyncio.Event()

    def on_change(change: Change) -> None:
        if change.job_id == "job-1":
            received.append(change)
            if change.seq == 2:
                arrived.set()

    engine = open_engine(engine_url)
    await engine.start(on_change)
    try:
        await engine.listen("job-1")
        state = make()
        await engine.insert(state)
        now = utc_now()
        decided = await engine.apply(
            "job-1", ProgressUpdate(Phase.ANALYZING, phase_progress=5.0), now, inputs_for(state)
        )
        await asyncio.wait_for(arrived.wait(), 5)
        assert isinstance(decided, Decided)
        change = received[-1]
        assert (change.seq, change.terminal, change.state_json) == (2, False, decided.state_json)
        assert change.changed_at == pytest.approx(now.timestamp(), abs=0.001)
    finally:
        await engine.stop()
# --- one id's keys are never another id's (issue 8, section 3) ----------------------------

COLLIDING_IDS = [
    "X:history", "X", "X:job", "X:changes", "job:X", "history:X", "changes:X", "X:ix",
    "X:history:history", "jobs", "owner:alice", "stats:comic", "idle:idle", "X.history", "X-1",
]


async def test_ids_that_look_like_other_ids_keys_never_collide(engine: Engine) -> None:
    """``X:history`` first, then ``X``: on a key layout that appends suffixes to ids, the
    second create would find the first one's keys (or be refused as taken)."""
    stored: dict[str, JobState] = {}
    for index, job_id in enumerate(COLLIDING_IDS):
        state = new_job(job_id=job_id, owner=f"owner-{index % 3}", kind="comic",
                        metadata={"i": index}, now=utc_now())
        await engine.insert(state)
        stored[job_id] = state
    for index, job_id in enumerate(COLLIDING_IDS):
        # Each one moves on by its own number of steps; nothing bleeds into another.
        state = stored[job_id]
        for progress in range(1, index % 4 + 2):
            new = step(state, float(progress))
            assert await engine.replace(new, expected_seq=state.seq)
            state = new
        stored[job_id] = state
    for job_id in COLLIDING_IDS:
        assert await engine.load(job_id) == stored[job_id]
        history = await engine.history(job_id, limit=100)
        assert [e["seq"] for e in history] == list(range(1, stored[job_id].seq + 1)), job_id
    for owner in ("owner-0", "owner-1", "owner-2"):
        listed = await engine.list_jobs(owner, active_only=False, limit=100)
        expected = {j for j, s in stored.items() if s.owner == owner}
        assert {s.job_id for s in listed} == expected
        assert all(s == stored[s.job_id] for s in listed)
    everyone = await engine.list_jobs(None, active_only=False, limit=100)
    assert {s.job_id for s in everyone} >= set(COLLIDING_IDS)
    with pytest.raises(JobExists):
        await engine.insert(make("X:history"))
    assert await engine.load("X:history") == stored["X:history"]


async def test_an_id_taken_by_another_owner_never_shows_in_the_loser_s_list(engine: Engine) -> None:
    await engine.insert(make("shared-id", "alice"))
    with pytest.raises(JobExists):
        await engine.insert(make("shared-id", "mallory"))
    assert [s.job_id for s in await engine.list_jobs("mallory", active_only=False, limit=10)] == []
    assert [s.job_id for s in await engine.list_jobs("alice", active_only=False, limit=10)] == ["shared-id"]


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("rediss+sentinel://127.0.0.1:26379/mymaster", r"not supported.*redis\+sentinel://host"),
        ("sentinel://127.0.0.1:26379/mymaster", r"not supported.*redis\+sentinel://host"),
        ("redis+sentinel://127.0.0.1:26379", "name the Sentinel service"),
        ("redis+sentinel://127.0.0.1:26379/", "name the Sentinel service"),
        ("redis+sentinel://127.0.0.1:26379/a/b/c", "name the Sentinel service"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "database 'x' is not a number"),
        ("redis+sentinel://127.0.0.1:port/mymaster", "sentinel port 'port' is not a number"),
        ("redis+sentinel://127.0.0.1:70000/mymaster", "out of range"),
        ("redis+sentinel://a:1,,b:2/mymaster", "a sentinel address is empty"),
    ],
)
def test_sentinel_urls_are_checked_before_anything_connects(url: str, refusal: str) -> None:
    with pytest.raises(ConfigurationError, match=refusal):
        open_engine(url)


def test_a_sentinel_url_names_its_sentinels_service_database_and_credentials() -> None:
    engine = open_engine("redis+sentinel://u:p%40ss@h1:1,[::1]:2,h3/mymaster/4?prefix=x")
    assert isinstance(engine, RedisEngine)
    target = engine.sentinel_target
    assert target is not None
    assert target.sentinels == (("h1", 1), ("::1", 2), ("h3", 26379))
    assert (target.service, target.db, target.username, target.password) == ("mymaster", 4, "u", "p@ss")


@pytest.mark.redis
async def test_sentinels_that_cannot_be_reached_are_a_503_that_hides_the_password() -> None:
    engine = open_engine(f"redis+sentinel://u:s3cret@127.0.0.1:{free_port()}/mymaster")
    with pytest.raises(EngineUnavailable, match="name no primary") as refused:
        await engine.start()
    assert "s3cret" not in str(refused.value)
    await engine.stop()


@pytest.mark.redis
async def test_a_cluster_node_with_another_database_is_refused(cluster_engine_url: str) -> None:
    engine = open_engine(cluster_engine_url.replace("/0?", "/3?"))
    with pytest.raises(ConfigurationError, match="only database 0"):
        await engine.start()


@pytest.mark.redis
async def test_writes_go_on_after_redis_forgets_its_scripts() -> None:
    """A restarted Redis, or a replica promoted on a cluster, has no scripts loaded: the
    pipelined write gets NOSCRIPT and is sent again on its own, loading the script.

    SCRIPT FLUSH empties the script cache of the whole server, so this runs on a private
    redis-server: on the shared one it would break every other process's scripted writes."""
    import redis.asyncio as aioredis

    with PrivateRedis() as server:
        engine = open_engine(f"{server.url}?prefix=forgetful")
        await engine.start()
        admin = aioredis.Redis.from_url(server.url)
        try:
            state = make("forgetful")
            await engine.insert(state)
            new = step(state, 10)
            assert await engine.replace(new, expected_seq=1)
            await admin.script_flush()
            newer = step(new, 20)
            assert await engine.replace(newer, expected_seq=2)
            await admin.script_flush()
            await asyncio.gather(*(engine.insert(make(f"forgetful-{i}")) for i in range(5)))
            assert await engine.load("forgetful") == newer
            listed = await engine.list_jobs("alice", active_only=False, limit=10)
            assert [s.seq for s in listed] == [1] * 5 + [3]
        finally:
            await admin.aclose()
            await engine.stop()
