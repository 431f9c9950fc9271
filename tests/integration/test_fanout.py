"""The per-process hub and mailboxes, on a real engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from phasecast.engines.base import Change
from phasecast.engines.sqlite import SQLiteEngine
from phasecast.fanout import Mailbox
from phasecast.model import JobState, Phase, utc_now
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
    await tracker.hub.add("j", first)
    assert tracker.hub.current("j") is None  # nothing seen yet: the first watcher reads
    state, _ = await tracker.watched_state("j")
    assert state.seq == 1
    await tracker.report("j", Phase.ANALYZING, 40)
    await tracker.hub.add("j", second)
    known = tracker.hub.current("j")
    assert known is not None
    current, encoded = known
    assert (current.seq, current.phase_progress, encoded.seq) == (2, 40.0, 2)
    assert current == await tracker.get("j")
    assert JobState.from_json(encoded.state_json) == current
    tracker.hub.remove("j", first)
    tracker.hub.remove("j", second)
    assert tracker.hub.current("j") is None
    assert tracker.hub.watchers == 0
