"""The resume cursor of a multiplexed SSE stream (``GET /v1/events``).

Clients treat it as opaque: they keep the ``id:`` of the last event they received and send it
back (``Last-Event-ID`` or ``?last_event_id=``). It records, for each job of the stream, the
epoch and seq of the last state delivered, so a resumed stream sends each job only what is
newer. A ``follow=active`` stream also records when it last looked for new jobs (the
watermark), so jobs created while the client was away are not missed.

Format (version 1; the server may change it, a client never parses it)::

    1,<watermark>,<job_id>~<epoch>~<seq>,<job_id>~<epoch>~<seq>,…

Job ids never contain ``,`` or ``~`` (``model.JOB_ID_PATTERN``), epochs are letters and digits,
so the text needs no escaping and is safe in an ``id:`` line, a header and a query string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from phasecast.errors import InvalidUpdate
from phasecast.model import JOB_ID_PATTERN

VERSION = "1"
# A job id is at most 128 characters, an epoch 32, a seq 18 digits, plus separators.
MAX_ENTRY_CHARS = 128 + 32 + 18 + 3
_JOB_MARKER = ',"epoch":"'
_JOB_ID = JOB_ID_PATTERN.pattern.removeprefix("^").removesuffix("$")
# Everything a cursor may look like (published in the OpenAPI document, checked first).
CURSOR_PATTERN = re.compile(
    rf"{VERSION},[0-9]{{0,18}}(?:,(?:{_JOB_ID}~[A-Za-z0-9]{{1,32}}~[0-9]{{1,18}})?)*"
)


@dataclass(slots=True, frozen=True)
class Mark:
    """What a client has of one job: the state with this epoch and seq."""

    epoch: str
    seq: int


@dataclass(slots=True)
class Cursor:
    marks: dict[str, Mark]
    watermark: int = 0


def entry(job_id: str, epoch: str, seq: int) -> str:
    """One job's part of a cursor."""
    return f"{job_id}~{epoch}~{seq}"


def format_cursor(watermark: int, entries: list[str]) -> str:
    return f"{VERSION},{watermark or ''}," + ",".join(entries)


_PREFIXES: dict[int, bytes] = {}


def cursor_prefix(watermark: int) -> bytes:
    """``id: `` and the cursor up to its first entry, as bytes: ``cursor_prefix(w) +
    b",".join(entries)`` is the ``id:`` line of ``format_cursor(w, entries)`` (the
    streams of one process share a few watermarks at a time, so they are kept)."""
    prefix = _PREFIXES.get(watermark)
    if prefix is None:
        if len(_PREFIXES) > 1024:
            _PREFIXES.clear()
        prefix = _PREFIXES[watermark] = f"id: {VERSION},{watermark or ''},".encode()
    return prefix


def epoch_of(state_json: str) -> str:
    """The top-level ``epoch`` of a state's JSON, without parsing it. The first
    ``,"epoch":"`` is the top-level key: it comes before metadata, and a quote inside an
    earlier string value is always escaped."""
    start = state_json.find(_JOB_MARKER)
    if start < 0:
        return ""
    start += len(_JOB_MARKER)
    return state_json[start : state_json.find('"', start)]


def parse_cursor(text: str, *, field: str, max_jobs: int) -> Cursor:
    """Parse a cursor the server made; anything else is refused with 422, naming ``field``."""
    if len(text) > 32 + max_jobs * (MAX_ENTRY_CHARS + 1):
        raise InvalidUpdate(field, f"is too long for a stream of at most {max_jobs} jobs")
    if not CURSOR_PATTERN.fullmatch(text):
        raise InvalidUpdate(
            field,
            "is not a cursor of GET /v1/events: send back the id of the last event received, "
            "unchanged (or leave it out to start from each job's current state)",
        )
    parts = text.split(",")
    raw_watermark = parts[1]
    marks: dict[str, Mark] = {}
    for raw in parts[2:]:
        if not raw:
            continue
        job_id, epoch, seq = raw.split("~")
        # The server never names a job twice; if a cursor does, the last entry counts.
        marks[job_id] = Mark(epoch, int(seq))
    if len(marks) > max_jobs:
        raise InvalidUpdate(field, f"names more than {max_jobs} jobs")
    return Cursor(marks, int(raw_watermark) if raw_watermark else 0)
