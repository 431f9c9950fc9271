"""The SSE resume points: what the server writes it reads back, and nothing else."""

from __future__ import annotations

import pytest

from phasecast.errors import InvalidUpdate
from phasecast.model import JobState, new_job, utc_now
from phasecast.server.sse_cursor import (
    CURSOR_PATTERN,
    MAX_MOVES,
    SEQ_RESUME_PATTERN,
    Cursor,
    Mark,
    Marks,
    Moves,
    chunk_size,
    cursor_start,
    entry,
    epoch_of,
    event_id,
    format_cursor,
    job_key,
    parse_cursor,
    parse_event_id,
)


def test_a_cursor_reads_back_what_was_written() -> None:
    long_id = "j" + "x" * 127
    text = format_cursor(
        1764400000,
        [entry("a", "9f3a1c2b7d4e", 3), entry("b.c:d-e_f", "0c1d2e3f4a5b", 12), entry(long_id, "e", 7)],
    )
    cursor = parse_cursor(text, field="Last-Event-ID", max_jobs=100)
    assert cursor.watermark == 1764400000
    assert cursor.mark("a", "9f3a1c2b7d4e") == Mark("9f3a1c2b7d4e", 3)
    assert cursor.mark("b.c:d-e_f", "0c1d2e3f4a5b") == Mark("0c1d2e3f4a5b", 12)
    assert cursor.mark(long_id, "e") == Mark("e", 7)
    assert "\n" not in text and "\r" not in text
    empty = parse_cursor(format_cursor(0, []), field="x", max_jobs=1)
    assert empty.empty and empty.watermark == 0


def test_an_entry_does_not_grow_with_the_job_id() -> None:
    short, long = entry("a", "9f3a1c2b7d4e", 123), entry("j" * 128, "9f3a1c2b7d4e", 123)
    assert len(short) == len(long) == 1 + 8 + 3
    # 100 jobs with 128-character ids: about 1.2 KB (version 1: about 15 KB).
    cursor = format_cursor(0, [entry(f"{i:03}" + "x" * 125, "9f3a1c2b7d4e", 123456) for i in range(100)])
    assert len(cursor) < 1600
    assert CURSOR_PATTERN.fullmatch(cursor)
    # Only characters that need no escaping in a URL (unreserved) or a header.
    assert set(cursor) <= set("0123456789.-_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_another_epoch_of_a_job_is_not_named_by_its_entry() -> None:
    cursor = parse_cursor(format_cursor(0, [entry("a", "9f3a1c2b7d4e", 5)]), field="x", max_jobs=5)
    assert cursor.mark("a", "000000000000") is None  # made again after a store loss
    assert cursor.mark("b", "9f3a1c2b7d4e") is None  # another job of that epoch
    assert job_key("a", "9f3a1c2b7d4e") != job_key("a", "9f3a1c2b7d4f")


def test_a_version_1_cursor_is_still_read() -> None:
    cursor = parse_cursor("1,1764400000,a~9f3a~3,b.c~0c1d~12", field="x", max_jobs=5)
    assert cursor.watermark == 1764400000
    assert cursor.marks == {"a": Mark("9f3a", 3), "b.c": Mark("0c1d", 12)}
    assert cursor.mark("a", "anything") == Mark("9f3a", 3)  # the hub compares the epochs


def test_a_job_named_twice_counts_its_last_entry() -> None:
    # The server never writes this; a cursor that matches the published pattern is read.
    cursor = parse_cursor("1,,a~e~1,a~f~2", field="x", max_jobs=1)
    assert cursor.marks == {"a": Mark("f", 2)}
    twice = format_cursor(0, [entry("a", "e", 1), entry("a", "e", 2)])
    assert parse_cursor(twice, field="x", max_jobs=1).mark("a", "e") == Mark("e", 2)


def test_the_published_pattern_is_what_the_parser_accepts() -> None:
    written = format_cursor(1764400000, [entry("a", "9f3a", 3), entry("b.c:d-e_f", "0c1d", 12)])
    assert CURSOR_PATTERN.fullmatch(written) and CURSOR_PATTERN.fullmatch(format_cursor(0, []))
    for text in (
        "", "1", "1,x", "1,,a~e", "1,,a~e~1\n", "1,,,a~e~1,", "2", "2.", "2.x", "2..AAAAAAAA",
        "2..AAAAAAAA1", "2..AAAAAAAA1.", "2...AAAAAAAA1", "2.5.AAAA+AAA1", "2..AAAAAAAA1\n",
    ):
        accepted = CURSOR_PATTERN.fullmatch(text) is not None
        try:
            parse_cursor(text, field="x", max_jobs=5)
        except InvalidUpdate:
            assert not accepted, text
        else:
            assert accepted, text


def test_the_per_job_id_carries_the_epoch() -> None:
    assert event_id(7, "9f3a1c2b7d4e") == "7.9f3a1c2b7d4e"
    assert event_id(7, "") == "7" and event_id(7, 'no"good') == "7"
    for text, mark in (("", None), ("7", Mark("", 7)), ("7.9f3a1c2b7d4e", Mark("9f3a1c2b7d4e", 7))):
        assert SEQ_RESUME_PATTERN.fullmatch(text)
        assert parse_event_id(text) == mark
    for bad in ("7.", ".e", "7.e.f", "-1", "7.e!", "1" * 19, "7." + "e" * 33, "null"):
        assert not SEQ_RESUME_PATTERN.fullmatch(bad), bad


def test_the_epoch_is_read_from_the_top_level_of_a_state() -> None:
    state: JobState = new_job(
        job_id="j", owner='x","epoch":"fake', kind="comic",
        metadata={"epoch": "nested"}, now=utc_now(), message='he said ","epoch":"no',
    )
    assert epoch_of(state.to_json()) == state.epoch


@pytest.mark.parametrize(
    "text",
    [
        "",
        "17",
        "2,,a~e~1",
        "2..AAAAAAA1",  # a key too short
        "2..AAAAAAAA",  # no seq
        "2..AAAAAAAA" + "9" * 19,
        "2.x.AAAAAAAA1",
        "2..AAAAAAAA1.AAAAAAAB1.AAAAAAAC1.AAAAAAAD1.AAAAAAAE1",  # more than 2 x max_jobs
        "2.." + "A" * 100_000,
        "2..AAAAAAAA\u0661",
        "1,x,a~e~1",
        "1,,a~e",
        "1,,a~e~1~2",
        "1,,a~e~-1",
        "1,,a~e~1.5",
        "1,,a~e~" + "9" * 19,
        "1,,bad id~e~1",
        "1,,a\n~e~1",
        "1,,a~e!~1",
        "1,," + ",".join(f"j{i}~e~1" for i in range(5)),
        "1,," + "a" * 100_000,
        "1,,a~e~\u0661",  # a digit, but not an ASCII one
    ],
)
def test_anything_else_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidUpdate) as refused:
        parse_cursor(text, field="last_event_id", max_jobs=2)
    assert refused.value.field == "last_event_id"


def test_the_start_and_entries_make_the_same_cursor_as_format_cursor() -> None:
    entries = [entry("a", "e1", 3), entry("b", "e2", 4)]
    for watermark in (0, 1764400000):
        line = cursor_start(watermark) + b"".join(e.encode() for e in entries)
        assert line == format_cursor(watermark, entries).encode()
    assert Cursor().empty


def test_marks_join_to_the_cursor_of_their_entries_through_every_change() -> None:
    marks = Marks()
    assert marks.joined() == format_cursor(0, []).encode()
    made = {job: entry(job, "e1", seq).encode() for job, seq in (("c", 3), ("a", 1), ("b", 2))}
    for job, part in made.items():
        marks.set(job, part)
    marks.setdefault("d", b"")  # named once a state of it is sent
    marks.setdefault("a", b"never")  # a job already named keeps its entry
    assert marks.get("a") == made["a"] and marks.get("d") == b"" and marks.get("zz") == b""
    assert marks.joined() == format_cursor(0, [made["c"].decode(), made["a"].decode(), made["b"].decode()]).encode()
    marks.set_watermark(1764400000)
    marks.pop("a")
    marks.pop("missing")
    marks.set("b", entry("b", "e1", 9).encode())
    parsed = parse_cursor(marks.joined().decode(), field="id", max_jobs=10)
    assert parsed.watermark == 1764400000
    assert parsed.keyed == {job_key("c", "e1"): 3, job_key("b", "e1"): 9}
    marks.sort()
    assert list(marks.slots) == ["b", "c", "d"] and len(marks) == 3 and "a" not in marks
    assert [marks.entries[at] for at in marks.slots.values()] == [
        entry("b", "e1", 9).encode(), made["c"], b""
    ]
    assert marks.joined() == b"".join(marks.entries)


def test_a_chunk_size_line_is_the_size_in_hex() -> None:
    assert chunk_size(0) == b"0\r\n"
    assert chunk_size(764) == b"2fc\r\n"
    assert chunk_size(764) is chunk_size(764)


def test_the_moves_of_a_change_are_bounded_and_start_over_with_the_next() -> None:
    moves = Moves()
    change = object()
    moves.begin(change, b".key00001" + b"7", b"event: state\ndata: {}\n")
    assert moves.head == b"event: state\ndata: {}\nid: "
    for n in range(MAX_MOVES + 5):
        moves.keep(b"2..c%d" % n, (b"", b"2..n%d" % n, None))
    assert 0 < len(moves.table) <= MAX_MOVES
    assert moves.table[b"2..c%d" % (MAX_MOVES + 4)][1] == b"2..n%d" % (MAX_MOVES + 4)
    moves.begin(object(), b".key000018", b"")
    assert moves.table == {} and moves.entry == b".key000018"
