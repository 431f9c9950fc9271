"""The per-process hub and mailboxes, on a real engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from phasecast.engines.base import Change
from phasecast.engines.redis import RedisEngine
from phasecast.engines.sqlite import SQLiteEngine
from phasecast.errors import JobNotFound
from phasecast.fanout import MAX_CONTROL_MESSAGES, Hub, Mailbox
from phasecast.model import JobState, Phase, utc_now
from phasecast.server.auth import Forbidden
from phasecast.tracker import ProgressTracker


@pytest.fixture
async def tracker(sqlite_engine_url: str) -> AsyncIterator[ProgressTracker]:
    async with ProgressTracker(SQLiteEngine(sqlite_engine_url)) as found:
        yield found


def change(seq: int, job_id: str = "j", terminal: bool = False) -> Change:
    return Change(job_id, seq, terminal, f'{{"seq":{seq}}}', utc_now().timestamp())


def test_a_mailbox_keeps_only_the_newest_pending_change_per_job() -> None:
    mailbox = Mailbox()
    mailbox.set_floor("j", 2)
    for seq in (1, 2, 3, 5, 4):
        mailbox.offer(change(seq))
    mailbox.offer(change(1, "k"))
    taken = mailbox.take()
    assert sorted((c.job_id, c.seq) for c in taken) == [("j", 5), ("k", 1)]
    assert mailbox.conflated == 1  # 3 was replaced by 5; 4 came too late to count
    mailbox.offer(change(5))
    assert mailbox.take() == []  # already delivered


def test_held_changes_wait_for_release_and_keep_the_newest() -> None:
    mailbox = Mailbox()
    mailbox.hold("j")
    mailbox.offer(change(2))
    mailbox.offer(change(3))
    assert mailbox.take() == []
    mailbox.release("j")
    assert [c.seq for c in mailbox.take()] == [3]


async def test_the_hub_serves_a_new_watcher_the_newest_state_without_a_read(
    tracker: ProgressTracker,
) -> None:
    await tracker.create(owner="alice", job_id="j")
    first, second = Mailbox(), Mailbox()
    assert tracker.hub.known("j") is None  # nothing seen yet: the first watcher reads
    assert (await tracker.hub.subscribe("j", first)).state.seq == 1
    assert [c.seq for c in first.take()] == [1]
    await tracker.report("j", Phase.ANALYZING, 40)
    assert [c.seq for c in first.take()] == [2]
    subscribed = await tracker.hub.subscribe("j", second)
    current = subscribed.state
    assert current is tracker.hub.known("j")
    [encoded] = second.take()
    assert (current.seq, current.phase_progress, encoded.seq) == (2, 40.0, 2)
    assert current == await tracker.get("j")
    assert JobState.from_json(encoded.state_json) == current
    tracker.hub.unsubscribe("j", first)
    tracker.hub.unsubscribe("j", second)
    assert tracker.hub.known("j") is None
    assert tracker.hub.watchers == 0


async def test_subscribe_reads_the_store_once_for_many_watchers(tracker: ProgressTracker) -> None:
    await tracker.create(owner="alice", job_id="j")
    reads: list[str] = []

    async def load(job_id: str) -> JobState:
        reads.append(job_id)
        return await tracker.get(job_id)

    hub = Hub(tracker.engine, load=load)
    tracker.engine._on_change = hub.dispatch  # this hub hears the engine's changes
    mailboxes = [Mailbox() for _ in range(5)]
    for mailbox in mailboxes:
        await hub.subscribe("j", mailbox)
    await tracker.report("j", Phase.ANALYZING, 10)
    late = Mailbox()
    await hub.subscribe("j", late)
    assert reads == ["j"]
    # Latest wins: seq 1 was still pending when 2 arrived.
    assert [[c.seq for c in m.take()] for m in mailboxes] == [[2]] * 5
    assert [c.seq for c in late.take()] == [2]


async def test_watchers_subscribing_at_once_share_one_store_read(tracker: ProgressTracker) -> None:
    """A reconnect storm: many watchers of one job the hub knows nothing of arrive
    together. One store read serves them all, and every one gets the snapshot."""
    await tracker.create(owner="alice", job_id="j")
    await tracker.report("j", Phase.ANALYZING, 10)
    reads: list[str] = []

    async def load(job_id: str) -> JobState:
        reads.append(job_id)
        return await tracker.get(job_id)

    hub = Hub(tracker.engine, load=load)
    tracker.engine._on_change = hub.dispatch
    mailboxes = [Mailbox() for _ in range(50)]
    results = await asyncio.gather(*(hub.subscribe("j", m) for m in mailboxes))
    assert reads == ["j"]
    assert {r.state.seq for r in results} == {2}
    assert [[c.seq for c in m.take()] for m in mailboxes] == [[2]] * 50
    await tracker.report("j", Phase.ANALYZING, 20)
    assert [[c.seq for c in m.take()] for m in mailboxes] == [[3]] * 50


async def test_a_change_during_a_shared_read_reaches_every_watcher_sharing_it(
    tracker: ProgressTracker,
) -> None:
    """The read was made before the change, and answers after it: every watcher waiting on
    that read still ends up with the change, once, after nothing older."""
    await tracker.create(owner="alice", job_id="j")
    reads: list[str] = []
    read_done = asyncio.Event()
    answer = asyncio.Event()

    async def load(job_id: str) -> JobState:
        reads.append(job_id)
        state = await tracker.get(job_id)  # seq 1, read now ...
        read_done.set()
        await answer.wait()  # ... answered later
        return state

    hub = Hub(tracker.engine, load=load)
    tracker.engine._on_change = hub.dispatch
    first, late = Mailbox(), Mailbox()
    subscribing = asyncio.create_task(hub.subscribe("j", first))
    await read_done.wait()
    joining = asyncio.create_task(hub.subscribe("j", late))
    await asyncio.sleep(0)  # ``late`` registers and waits on the shared read (no I/O on the way)
    assert not joining.done()
    await tracker.report("j", Phase.ANALYZING, 10)  # seq 2, while the read is unanswered
    answer.set()
    assert (await subscribing).state.seq == 2
    assert (await joining).state.seq == 2
    assert reads == ["j"]
    assert [c.seq for c in first.take()] == [2]
    assert [c.seq for c in late.take()] == [2]


async def test_a_failed_shared_read_fails_every_watcher_and_the_next_one_reads_again(
    tracker: ProgressTracker,
) -> None:
    reads: list[str] = []

    async def load(job_id: str) -> JobState:
        reads.append(job_id)
        return await tracker.get(job_id)

    hub = Hub(tracker.engine, load=load)
    results = await asyncio.gather(
        *(hub.subscribe("missing", Mailbox()) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, JobNotFound) for r in results)
    assert reads == ["missing"] and hub.watchers == 0
    await tracker.create(owner="alice", job_id="missing")
    assert (await hub.subscribe("missing", Mailbox())).state.seq == 1
    assert reads == ["missing", "missing"]


async def test_store_reads_asked_for_in_one_loop_turn_go_out_as_one_batch(
    redis_engine_url: str,
) -> None:
    """A reconnect storm on Redis: watchers of many jobs the hub has not seen subscribe at
    once. Their reads leave as one pipelined batch; a job missing from the store still
    fails with JobNotFound through the single read, and the others are unaffected."""
    async with ProgressTracker(RedisEngine(redis_engine_url)) as tracker:
        ids = [f"storm-{n}" for n in range(20)]
        for job_id in ids:
            await tracker.create(owner="alice", job_id=job_id)
            await tracker.report(job_id, Phase.ANALYZING, 30)
        engine = tracker.engine
        assert isinstance(engine, RedisEngine)
        batches: list[list[str]] = []
        singles: list[str] = []

        async def load_many(job_ids: list[str]) -> list[JobState | None]:
            batches.append(list(job_ids))
            return await engine.load_many(job_ids)

        async def load(job_id: str) -> JobState:
            singles.append(job_id)
            return await tracker.get(job_id)

        hub = Hub(engine, load=load, load_many=load_many)
        engine._on_change = hub.dispatch
        for job_id in [*ids, "storm-missing"]:
            # Listened already (as after the first watcher of each job), so that every
            # subscribe reaches its read in the same loop turn, as a storm's do.
            await engine.listen(job_id)
        mailboxes = {job_id: [Mailbox(), Mailbox()] for job_id in [*ids, "storm-missing"]}
        results = await asyncio.gather(
            *(hub.subscribe(job_id, m) for job_id, pair in mailboxes.items() for m in pair),
            return_exceptions=True,
        )
        assert [sorted(batch) for batch in batches] == [sorted([*ids, "storm-missing"])]
        assert singles == ["storm-missing"]
        assert all(isinstance(r, JobNotFound) for r in results[-2:])
        assert {r.state.seq for r in results[:-2] if not isinstance(r, BaseException)} == {2}
        for job_id in ids:
            assert [[c.seq for c in m.take()] for m in mailboxes[job_id]] == [[2], [2]]
        assert hub.watchers == 40
        # Known now: the next watcher is served without any read.
        await hub.subscribe(ids[0], Mailbox())
        assert len(batches) == 1 and singles == ["storm-missing"]
        for job_id in ids:
            for mailbox in mailboxes[job_id]:
                hub.unsubscribe(job_id, mailbox)
        await hub.close()


async def test_subscribe_authorises_before_anything_reaches_the_mailbox(
    tracker: ProgressTracker,
) -> None:
    await tracker.create(owner="alice", job_id="j")
    refused = Mailbox()

    def deny(state: JobState) -> None:
        raise Forbidden("not yours")

    with pytest.raises(Forbidden):
        await tracker.hub.subscribe("j", refused, authorise=deny)
    await tracker.report("j", Phase.ANALYZING, 10)
    assert refused.take() == [] and tracker.hub.watchers == 0

    with pytest.raises(JobNotFound):
        await tracker.hub.subscribe("missing", Mailbox())
    assert tracker.hub.watched_jobs == 0

    allowed = Mailbox()

    def acknowledge(state: JobState) -> None:
        allowed.say("subscribed")

    await tracker.hub.subscribe("j", allowed, authorise=acknowledge)
    assert allowed.take_control() == ["subscribed"]
    assert [c.seq for c in allowed.take()] == [2]
    tracker.hub.unsubscribe("j", allowed)


async def test_a_resume_point_the_server_cannot_honour_gets_the_full_state(
    tracker: ProgressTracker,
) -> None:
    state = await tracker.create(owner="alice", job_id="j")
    await tracker.report("j", Phase.ANALYZING, 10)
    # (since relative to the current seq, epoch or None for the job's own, full state sent)
    cases = {
        "honoured": (0, None, False),
        "behind": (-1, None, True),
        "beyond the current seq": (40, None, True),
        "another epoch": (0, "other-epoch", True),
    }
    for name, (offset, epoch, full) in cases.items():
        current = await tracker.get("j")
        mailbox = Mailbox()
        await tracker.hub.subscribe(
            "j", mailbox, since=current.seq + offset, epoch=epoch or state.epoch
        )
        assert [c.seq for c in mailbox.take()] == ([current.seq] if full else []), name
        await tracker.report("j", Phase.ANALYZING, 10 + current.seq)  # later changes arrive
        assert [c.seq for c in mailbox.take()] == [current.seq + 1], name
        tracker.hub.unsubscribe("j", mailbox)
    await tracker.complete("j")
    final = (await tracker.get("j")).seq
    done = Mailbox()
    assert (await tracker.hub.subscribe("j", done, since=final)).ended
    assert tracker.hub.watchers == 0
    assert (await tracker.hub.subscribe("j", done, since=final + 5)).ended is False
    assert [c.seq for c in done.take()] == [final]


def test_control_messages_are_never_dropped_and_a_flood_is_reported() -> None:
    mailbox = Mailbox()
    for n in range(MAX_CONTROL_MESSAGES):
        assert mailbox.say(str(n))
    assert not mailbox.say("one too many")
    assert mailbox.overloaded
    assert mailbox.take_control() == [str(n) for n in range(MAX_CONTROL_MESSAGES)] + ["one too many"]


class _Meter:
    def __init__(self) -> None:
        self.count = 0
        self.last: Change | None = None
        self.noted: list[int] = []

    def note(self, change: Change) -> None:
        self.last = change
        self.noted.append(change.seq)


async def test_the_lane_writes_only_while_nothing_is_queued_and_keeps_the_order(
    tracker: ProgressTracker,
) -> None:
    await tracker.create(owner="alice", job_id="j")
    mailbox, meter, wire = Mailbox(), _Meter(), []
    mailbox.open_lane(wire.append, lambda c: b"state %d" % c.seq, meter)
    assert mailbox.lane is not None
    await tracker.hub.subscribe("j", mailbox)
    # No ``direct``: the current state is queued, and the lane shut until it is taken.
    assert mailbox.lane is None
    assert [c.seq for c in mailbox.take()] == [1]
    assert mailbox.lane is not None
    await tracker.report("j", Phase.ANALYZING, 10)
    assert wire == [b"state 2"]
    assert (meter.count, meter.noted, mailbox.last and mailbox.last.seq) == (1, [2], 2)
    assert mailbox.take() == []  # written through the lane: delivered, nothing pending
    tracker.hub.dispatch(change(2))  # a seq the watcher has: skipped
    assert wire == [b"state 2"]

    # A control message queued: the next state waits behind it, on the mailbox's path.
    mailbox.say("ack")
    await tracker.report("j", Phase.ANALYZING, 20)
    assert wire == [b"state 2"]
    assert mailbox.take_control() == ["ack"]
    assert mailbox.lane is None  # the state is still queued
    assert [c.seq for c in mailbox.take()] == [3]
    assert mailbox.lane is not None

    # The transport backed up: nothing through the lane until it opens it again.
    mailbox.open_lane(None)
    await tracker.report("j", Phase.ANALYZING, 30)
    await tracker.report("j", Phase.ANALYZING, 40)
    assert wire == [b"state 2"]
    mailbox.open_lane(wire.append)
    assert mailbox.lane is None  # latest wins, queued: the transport drains it first
    assert [c.seq for c in mailbox.take()] == [5]
    await tracker.report("j", Phase.ANALYZING, 50)
    assert wire == [b"state 2", b"state 6"]

    # A terminal state never takes the lane: its transport ends the subscription.
    await tracker.complete("j")
    assert wire == [b"state 2", b"state 6"]
    assert [c.terminal for c in mailbox.take()] == [True]
    tracker.hub.unsubscribe("j", mailbox)
    assert tracker.hub.watchers == 0


async def test_the_lane_skips_a_mailbox_that_left_the_job(tracker: ProgressTracker) -> None:
    await tracker.create(owner="alice", job_id="j")
    staying, leaving, wire = Mailbox(), Mailbox(), []
    for mailbox in (staying, leaving):
        mailbox.open_lane(lambda data, box=mailbox: wire.append((box, data)), lambda c: b"s", _Meter())
        await tracker.hub.subscribe("j", mailbox)
        mailbox.take()
    # ``leaving`` left while a dispatch already holds its copy of the watchers: it forgot
    # the job, so the lane must not write to it.
    leaving.forget("j")
    await tracker.report("j", Phase.ANALYZING, 10)
    assert wire == [(staying, b"s")]
    tracker.hub.unsubscribe("j", staying)
    tracker.hub.unsubscribe("j", leaving)
