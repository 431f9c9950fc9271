"""The SQLite engine's own promises, beyond the contract every engine keeps: the states its
writer thread keeps never outvote the stored rows, a failing write fails its whole
transaction and stores nothing, and the history entries it writes by hand are what
``json.dumps`` writes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from phasecast.engines.base import Decided, Ending, OtherJob, RuleInputs, history_entry
from phasecast.engines.sqlite import SQLiteEngine, history_json, respell
from phasecast.errors import EngineUnavailable, InvalidUpdate, JobNotFound, JobTerminal
from phasecast.model import JobState, Phase, ProgressUpdate, apply_progress, new_job, utc_now
from phasecast.progress import COMIC_WEIGHTS, PhaseStat


def make(job_id: str) -> JobState:
    return new_job(job_id=job_id, owner="alice", kind="comic", metadata={}, now=utc_now())


INPUTS = RuleInputs("comic", "alice", dict(COMIC_WEIGHTS), {})


def report(progress: float, message: str | None = None) -> ProgressUpdate:
    return ProgressUpdate(Phase.GENERATING, phase_progress=progress, message=message)


def stored(path: Path, job_id: str) -> JobState:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT state, seq FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    state = JobState.from_json(row[0])
    assert state.seq == row[1]
    return state


def history_seqs(path: Path, job_id: str) -> list[int]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, entry FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,))
        found = [(seq, json.loads(entry)) for seq, entry in rows]
    assert all(entry["seq"] == seq for seq, entry in found)
    return [seq for seq, _ in found]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "phasecast.db"


@pytest.fixture
async def engine(path: Path) -> AsyncIterator[SQLiteEngine]:
    found = SQLiteEngine(f"sqlite:///{path}")
    await found.start()
    yield found
    await found.stop()


@pytest.mark.parametrize(
    "message",
    ["", "Generating", 'quote " backslash \\ slash /', "line\nbreak\ttab\x01\x1f", "é ✏️ 𝄞 \u2028 \ud7ff"],
)
def test_history_entries_are_what_json_dumps_writes(message: str) -> None:
    state = make("job-1")
    later = utc_now() + timedelta(seconds=3)
    state = apply_progress(state, report(12.3456, message), later, COMIC_WEIGHTS).state
    state.seq = 123456789012
    assert history_json(state) == json.dumps(history_entry(state), separators=(",", ":"))
    state.phase_progress, state.progress = 100.0, 0.0
    assert history_json(state) == json.dumps(history_entry(state), separators=(",", ":"))


async def test_a_commit_by_another_connection_is_decided_from_the_stored_row(
    engine: SQLiteEngine, path: Path
) -> None:
    await engine.insert(make("job-1"))
    first = await engine.apply("job-1", report(10.0, "mine"), utc_now(), INPUTS)
    assert isinstance(first, Decided) and first.applied  # the writer now keeps seq 2
    # Another process changes the job behind the engine's back (seq 3, its own message).
    theirs = apply_progress(stored(path, "job-1"), report(50.0, "theirs"), utc_now(), COMIC_WEIGHTS).state
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET seq = ?, state = ? WHERE job_id = ?",
                   (theirs.seq, theirs.to_json(), "job-1"))
        db.execute("INSERT INTO job_events VALUES (?, ?, ?)", ("job-1", theirs.seq, history_json(theirs)))
    # A report below their progress is late against the stored row (not against seq 2).
    late = await engine.apply("job-1", report(20.0), utc_now(), INPUTS)
    assert late == Decided(False, theirs.to_json())
    later = await engine.apply("job-1", report(60.0), utc_now(), INPUTS)
    assert isinstance(later, Decided) and later.applied
    now = stored(path, "job-1")
    assert later.state_json == now.to_json()
    assert (now.seq, now.phase_progress, now.message) == (4, 60.0, "theirs")
    assert history_seqs(path, "job-1") == [1, 2, 3, 4]


async def test_a_kept_state_that_went_stale_is_never_written_over_the_row(
    engine: SQLiteEngine, path: Path
) -> None:
    await engine.insert(make("job-1"))
    assert isinstance(await engine.apply("job-1", report(10.0), utc_now(), INPUTS), Decided)
    # Written on the engine's own connection, which ``execute`` must not do to its tables:
    # nothing tells the writer thread, whose kept state is now stale.
    theirs = apply_progress(stored(path, "job-1"), report(50.0, "theirs"), utc_now(), COMIC_WEIGHTS).state

    def behind_its_back(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE jobs SET seq = ?, state = ? WHERE job_id = ?",
                     (theirs.seq, theirs.to_json(), "job-1"))

    await engine.execute(behind_its_back)
    with pytest.raises(EngineUnavailable):
        await engine.apply("job-1", report(20.0, "stale"), utc_now(), INPUTS)
    assert stored(path, "job-1") == theirs  # the report decided from seq 2 stored nothing
    assert history_seqs(path, "job-1") == [1, 2]
    # The next report is decided from the row.
    again = await engine.apply("job-1", report(60.0), utc_now(), INPUTS)
    assert isinstance(again, Decided) and again.applied
    assert (stored(path, "job-1").seq, stored(path, "job-1").message) == (4, "theirs")


async def test_a_failing_write_fails_its_whole_transaction_and_stores_nothing(
    engine: SQLiteEngine, path: Path
) -> None:
    for job_id in ("good", "bad"):
        await engine.insert(make(job_id))
    with sqlite3.connect(path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON jobs WHEN NEW.job_id = 'bad' "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    before = {job_id: stored(path, job_id) for job_id in ("good", "bad")}
    answers = await asyncio.gather(
        *(engine.apply(job_id, report(10.0), utc_now(), INPUTS) for job_id in ("good", "bad", "good")),
        return_exceptions=True,
    )
    assert isinstance(answers[1], EngineUnavailable)
    assert stored(path, "bad") == before["bad"] and history_seqs(path, "bad") == [1]
    # Whatever "good" was answered is what is stored: applied in a transaction of its own,
    # or refused with the rest of the one it shared with "bad".
    good = stored(path, "good")
    applied = [a for a in answers if isinstance(a, Decided) and a.applied]
    if applied:
        assert applied[-1].state_json == good.to_json() and good.seq == 2
    else:
        assert good == before["good"]
    assert all(isinstance(a, Decided | EngineUnavailable) for a in answers)
    assert history_seqs(path, "good") == list(range(1, good.seq + 1))
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER refuse")
    after = await engine.apply("bad", report(30.0), utc_now(), INPUTS)
    assert isinstance(after, Decided) and after.applied
    assert stored(path, "bad").seq == 2 and history_seqs(path, "bad") == [1, 2]


async def test_reports_of_one_job_in_one_transaction_each_get_their_own_seq(
    engine: SQLiteEngine, path: Path
) -> None:
    received: list[tuple[str, int]] = []
    await engine.stop()
    await engine.start(lambda change: received.append((change.job_id, change.seq)))
    for job_id in ("a", "b"):
        await engine.insert(make(job_id))
    received.clear()
    answers = await asyncio.gather(*(
        engine.apply(job_id, report(float(n)), utc_now(), INPUTS)
        for n in range(1, 21) for job_id in ("a", "b")
    ))
    assert all(isinstance(a, Decided) and a.applied for a in answers)
    for job_id in ("a", "b"):
        assert stored(path, job_id).seq == 21 and stored(path, job_id).phase_progress == 20.0
        assert history_seqs(path, job_id) == list(range(1, 22))
        assert [seq for job, seq in received if job == job_id] == list(range(2, 22))


@pytest.mark.parametrize(("query", "level"), [("", 2), ("?synchronous=normal", 1), ("?synchronous=extra", 3)])
async def test_every_commit_is_synced_to_disk_unless_the_url_says_otherwise(
    path: Path, query: str, level: int
) -> None:
    # FULL (2): WAL mode syncs the log on every commit, so an acknowledged report survives
    # a power loss too; NORMAL (1) only at checkpoints.
    engine = SQLiteEngine(f"sqlite:///{path}{query}")
    await engine.start()
    try:
        modes = await engine.execute(
            lambda conn: (conn.execute("PRAGMA journal_mode").fetchone()[0],
                          conn.execute("PRAGMA synchronous").fetchone()[0])
        )
    finally:
        await engine.stop()
    assert modes == ("wal", level)


# --- apply_many: a batch of reports, one request to the writer thread ----------------------


async def test_a_batch_is_decided_in_order_with_one_answer_per_report(path: Path) -> None:
    received: list[tuple[str, int]] = []
    engine = SQLiteEngine(f"sqlite:///{path}")
    await engine.start(lambda change: received.append((change.job_id, change.seq)))
    try:
        for job_id in ("a", "b", "ended"):
            await engine.insert(make(job_id))
        done = await engine.end("ended", Ending(Phase.COMPLETE), utc_now(), INPUTS)
        assert isinstance(done, Decided) and done.applied
        received.clear()
        now = utc_now()
        bob = RuleInputs("comic", "bob", dict(COMIC_WEIGHTS), {})
        items = [
            ("a", report(10.0, "a1"), INPUTS),
            ("b", report(5.0), INPUTS),
            ("a", report(30.0, "a2"), INPUTS),
            ("a", report(20.0), INPUTS),  # late: below what this batch already stored
            ("missing", report(1.0), INPUTS),
            ("ended", report(1.0), INPUTS),
            ("b", report(6.0), bob),  # asked with another owner: nothing decided
            ("a", ProgressUpdate(Phase.GENERATING, phase_progress=40.0, step="panel-1"), INPUTS),
            ("a", report(30.0, "a2"), INPUTS),  # a repeat of what is stored
            ("b", report(7.0), INPUTS),
        ]
        answers = await engine.apply_many(items, now)
    finally:
        await engine.stop()
    assert len(answers) == len(items)
    a1, b1, a2, late, missing, ended, other, invalid, repeat, b2 = answers
    assert isinstance(a1, Decided) and a1.applied and JobState.from_json(a1.state_json).seq == 2
    assert isinstance(a2, Decided) and a2.applied and JobState.from_json(a2.state_json).seq == 3
    assert late == Decided(False, a2.state_json) and repeat == Decided(False, a2.state_json)
    assert isinstance(missing, JobNotFound) and isinstance(ended, JobTerminal)
    assert other == OtherJob("comic", "alice")
    assert isinstance(invalid, InvalidUpdate)
    assert isinstance(b1, Decided) and isinstance(b2, Decided) and b2.applied
    assert JobState.from_json(b2.state_json).phase_progress == 7.0
    assert stored(path, "a").to_json() == a2.state_json and stored(path, "b").to_json() == b2.state_json
    assert history_seqs(path, "a") == [1, 2, 3] and history_seqs(path, "b") == [1, 2, 3]
    assert received == [("a", 2), ("b", 2), ("a", 3), ("b", 3)]  # once each, in order


async def test_a_batch_with_a_failing_write_stores_none_of_it(engine: SQLiteEngine, path: Path) -> None:
    for job_id in ("good", "bad"):
        await engine.insert(make(job_id))
    with sqlite3.connect(path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON jobs WHEN NEW.job_id = 'bad' "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    answers = await engine.apply_many(
        [("good", report(10.0), INPUTS), ("bad", report(10.0), INPUTS), ("good", report(20.0), INPUTS)],
        utc_now(),
    )
    assert len(answers) == 3 and all(isinstance(a, EngineUnavailable) for a in answers)
    assert stored(path, "good").seq == 1 and history_seqs(path, "good") == [1]
    assert stored(path, "bad").seq == 1 and history_seqs(path, "bad") == [1]
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER refuse")
    again = await engine.apply_many([("good", report(20.0), INPUTS), ("bad", report(20.0), INPUTS)], utc_now())
    assert [JobState.from_json(a.state_json).seq for a in again if isinstance(a, Decided)] == [2, 2]


async def test_a_batch_for_a_stopped_engine_is_answered_unavailable_item_by_item(path: Path) -> None:
    engine = SQLiteEngine(f"sqlite:///{path}")
    answers = await engine.apply_many([("a", report(1.0), INPUTS), ("b", report(1.0), INPUTS)], utc_now())
    assert len(answers) == 2 and all(isinstance(a, EngineUnavailable) for a in answers)
    assert await engine.apply_many([], utc_now()) == []


async def test_answers_carry_the_summary_of_the_state_they_answer_with(engine: SQLiteEngine) -> None:
    await engine.insert(make("job-1"))
    answers = [
        await engine.apply("job-1", report(10.0), utc_now(), INPUTS),
        await engine.apply("job-1", report(5.0), utc_now(), INPUTS),  # late: the stored state
        *await engine.apply_many([("job-1", report(20.0), INPUTS)], utc_now()),
        await engine.end("job-1", Ending(Phase.FAILED, "gave up"), utc_now(), INPUTS),
    ]
    for answer in answers:
        assert isinstance(answer, Decided)
        state = JobState.from_json(answer.state_json)
        assert (answer.seq, answer.phase, answer.progress) == (state.seq, state.phase.value, state.progress)
    assert [a.seq for a in answers if isinstance(a, Decided)] == [2, 2, 3, 4]


async def test_requests_that_meet_a_stopping_engine_are_all_answered(path: Path) -> None:
    engine = SQLiteEngine(f"sqlite:///{path}")
    await engine.start()
    await engine.insert(make("job-1"))
    before = [asyncio.create_task(engine.apply("job-1", report(float(n)), utc_now(), INPUTS)) for n in (1, 2)]
    stopping = asyncio.create_task(engine.stop())
    await asyncio.sleep(0)  # the stop is queued; these come after it
    after = [
        asyncio.create_task(engine.apply("job-1", report(3.0), utc_now(), INPUTS)),
        asyncio.create_task(engine.apply_many([("job-1", report(4.0), INPUTS)], utc_now())),
    ]
    await asyncio.wait_for(stopping, 10)
    answers = await asyncio.wait_for(asyncio.gather(*before, *after, return_exceptions=True), 10)
    assert [a.seq for a in answers[:2] if isinstance(a, Decided)] == [2, 3]
    assert isinstance(answers[2], EngineUnavailable)
    assert isinstance(answers[3], list) and isinstance(answers[3][0], EngineUnavailable)
    assert stored(path, "job-1").seq == 3


async def test_a_restarted_engine_decides_from_what_was_written_while_it_was_stopped(
    engine: SQLiteEngine, path: Path
) -> None:
    await engine.insert(make("job-1"))
    assert isinstance(await engine.apply("job-1", report(10.0), utc_now(), INPUTS), Decided)
    await engine.stop()
    theirs = apply_progress(stored(path, "job-1"), report(50.0, "theirs"), utc_now(), COMIC_WEIGHTS).state
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET seq = ?, state = ? WHERE job_id = ?", (theirs.seq, theirs.to_json(), "job-1"))
    await engine.start()
    late = await engine.apply("job-1", report(20.0), utc_now(), INPUTS)
    assert late == Decided(False, theirs.to_json())


# --- respelling: the common report re-encodes only the fields it changed -------------------

# Control characters a job keeps (NUL is refused before any engine sees it: model.validate_text).
MESSAGES = ["", "plain", 'quote " backslash \\', "line\nbreak\x01\x1f", "é ✏️ 𝄞 \u2028", "t=1764423000.123456"]


async def test_every_stored_state_is_exactly_what_to_json_writes(engine: SQLiteEngine, path: Path) -> None:
    learned = {Phase.GENERATING: PhaseStat(40.0, 3), Phase.POST_PROCESSING: PhaseStat(9.5, 2)}
    with_eta = RuleInputs("comic", "alice", dict(COMIC_WEIGHTS), learned)
    job = new_job(job_id="job-1", owner='al "ice" ✏️', kind="comic", metadata={"k": ["é", 1.5, None]}, now=utc_now())
    await engine.insert(job)
    owner_inputs = [RuleInputs("comic", job.owner, i.weights, i.stats) for i in (INPUTS, with_eta)]
    start = utc_now()
    answers = []
    progress = 0.0
    for n in range(60):
        progress = min(100.0, progress + (1e-05 if n % 7 == 0 else 1 / 3))
        if n < 3:  # entering a phase, then its message only: no ETA yet
            update = ProgressUpdate(Phase.ANALYZING, message=MESSAGES[n + 1])
        elif n % 10 == 9 and n > 20:
            update = ProgressUpdate(Phase.GENERATING, step=f"panel-{n % 3}", step_progress=progress)
        else:
            update = ProgressUpdate(Phase.ANALYZING if n < 20 else Phase.GENERATING,
                                    phase_progress=None if n == 20 else round(progress, 5),
                                    message=MESSAGES[n % len(MESSAGES)] if n % 4 else None)
        answers.append(await engine.apply("job-1", update, start + timedelta(seconds=n), owner_inputs[n % 2]))
    answers.append(await engine.end("job-1", Ending(Phase.COMPLETE), start + timedelta(seconds=99), INPUTS))
    applied = [a for a in answers if isinstance(a, Decided) and a.applied]
    assert len(applied) > 40
    for answer in applied:
        assert answer.state_json == JobState.from_json(answer.state_json).to_json()
    assert stored(path, "job-1").to_json() == applied[-1].state_json
    etas = {JobState.from_json(a.state_json).eta_seconds is None for a in applied}
    assert etas == {True, False}  # both spellings of the ETA were written


def test_respelling_is_refused_for_anything_but_the_common_report() -> None:
    old = apply_progress(make("job-1"), report(10.0), utc_now(), COMIC_WEIGHTS).state
    old_json = old.to_json()
    common = apply_progress(old, report(20.0, "ok ✏️"), utc_now(), COMIC_WEIGHTS).state
    assert respell(old, old_json, common) == common.to_json()
    stepped = apply_progress(old, ProgressUpdate(Phase.GENERATING, step="p", step_progress=5.0), utc_now(),
                             COMIC_WEIGHTS).state
    moved = apply_progress(old, ProgressUpdate(Phase.POST_PROCESSING), utc_now(), COMIC_WEIGHTS).state
    counted = apply_progress(old, ProgressUpdate(Phase.GENERATING, steps_total=4), utc_now(), COMIC_WEIGHTS).state
    for other in (stepped, moved, counted):
        assert respell(old, old_json, other) is None
    odd = common.copy()
    odd.metadata = dict(odd.metadata)
    assert respell(old, old_json, odd) is None
    odd = common.copy()
    odd.progress = float("nan")
    assert respell(old, old_json, odd) is None
