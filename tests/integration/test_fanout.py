"""The per-process hub and mailboxes, on a real engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from phasecast.engines.base import Change
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
