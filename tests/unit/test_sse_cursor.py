"""The multiplexed SSE cursor: what the server writes it reads back, and nothing else."""

from __future__ import annotations

import pytest

from phasecast.errors import InvalidUpdate
from phasecast.model import JobState, new_job, utc_now
from phasecast.server.sse_cursor import (
    CURSOR_PATTERN,
    Mark,
    cursor_prefix,
    entry,
    epoch_of,
    format_cursor,
    parse_cursor,
)


def test_a_cursor_reads_back_what_was_written() -> None:
    text = format_cursor(1764400000, [entry("a", "9f3a1c2b7d4e", 3), entry("b.c:d-e_f", "0c1d2e3f4a5b", 12)])
    cursor = parse_cursor(text, field="Last-Event-ID", max_jobs=100)
    assert cursor.watermark == 1764400000
    assert cursor.marks == {"a": Mark("9f3a1c2b7d4e", 3), "b.c:d-e_f": Mark("0c1d2e3f4a5b", 12)}
    assert "\n" not in text and "\r" not in text
    empty = parse_cursor(format_cursor(0, []), field="x", max_jobs=1)
    assert empty.marks == {} and empty.watermark == 0


def test_a_job_named_twice_counts_its_last_entry() -> None:
    # The server never writes this; a cursor that matches the published pattern is read.
    cursor = parse_cursor("1,,a~e~1,a~f~2", field="x", max_jobs=1)
    assert cursor.marks == {"a": Mark("f", 2)}


def test_the_published_pattern_is_what_the_parser_accepts() -> None:
    written = format_cursor(1764400000, [entry("a", "9f3a", 3), entry("b.c:d-e_f", "0c1d", 12)])
    assert CURSOR_PATTERN.fullmatch(written) and CURSOR_PATTERN.fullmatch(format_cursor(0, []))
    for text in ("", "1", "1,x", "1,,a~e", "1,,a~e~1\n", "1,,,a~e~1,"):
        accepted = CURSOR_PATTERN.fullmatch(text) is not None
        try:
            parse_cursor(text, field="x", max_jobs=5)
        except InvalidUpdate:
            assert not accepted, text
        else:
            assert accepted, text


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
        "1,x,a~e~1",
        "1,,a~e",
        "1,,a~e~1~2",
        "1,,a~e~-1",
        "1,,a~e~1.5",
        "1,,a~e~" + "9" * 19,
        "1,,bad id~e~1",
        "1,,a\n~e~1",
        "1,,a~e!~1",
        "1,," + ",".join(entry(f"j{i}", "e", 1) for i in range(3)),
        "1,," + "a" * 100_000,
        "1,,a~e~\u0661",  # a digit, but not an ASCII one
    ],
)
def test_anything_else_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidUpdate) as refused:
        parse_cursor(text, field="last_event_id", max_jobs=2)
    assert refused.value.field == "last_event_id"


def test_the_prefix_and_entries_make_the_same_cursor_as_format_cursor() -> None:
    entries = [entry("a", "e1", 3), entry("b", "e2", 4)]
    for watermark in (0, 1764400000):
        line = cursor_prefix(watermark) + b",".join(e.encode() for e in entries)
        assert line == b"id: " + format_cursor(watermark, entries).encode()
