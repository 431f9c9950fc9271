"""Resume points of the SSE routes: the multiplexed stream's cursor, the per-job stream's id.

Clients treat both as opaque: they keep the ``id:`` of the last event they received and send
it back (``Last-Event-ID`` or ``?last_event_id=``).

**The cursor of ``GET /v1/events``** records, for each job of the stream, which state of it
the client has: a *key* naming the job and its epoch together, and the seq. A resumed stream
sends each job only what is newer. A ``follow=active`` stream also records when it last
looked for new jobs (the watermark), so jobs created while the client was away are not
missed. Format (version 2; the server may change it, a client never parses it)::

    2.<watermark>.<key><seq>.<key><seq>…

``<key>`` is 8 URL-safe base64 characters, the first 48 bits of BLAKE2b over the job's epoch
and id; ``<seq>`` its digits; the watermark is empty except on follow streams. An entry costs
about a dozen characters whatever the length of the job id (a 128-character id cost 150 in
version 1), the text needs no escaping in an ``id:`` line, a header or a query string (``.``,
``-`` and ``_`` are unreserved), and it is the same for every stream, so it is made once per
change. The key cannot be read back into a job id: the server matches it against the jobs it
is asked to stream (``job=``) or finds (``follow=active``), hashing each with its current
epoch. A job lost by the store and made again has a new epoch, so its key no longer matches
and it starts from its full current state, as a job the cursor does not name. Two jobs of one
stream with the same key (one chance in 2^48 per pair) are both treated as not named: their
states are sent again, never skipped.

Version 1 cursors (``1,<watermark>,<job_id>~<epoch>~<seq>,…``, written before) are still
read, so a client that reconnects across an upgrade resumes as before.

**The per-job stream's id** (``GET /v1/jobs/{id}/events``) is ``<seq>.<epoch>``: the seq, and
the epoch it belongs to, so a resume after a store loss is recognised (another epoch: the
full current state is sent). A bare ``<seq>`` (the id written before, or ``?since=``) is
read as a seq of an unknown epoch.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass, field

from phasecast.errors import InvalidUpdate
from phasecast.model import JOB_ID_PATTERN

VERSION = "2"
KEY_CHARS = 8
MAX_SEQ_DIGITS = 18
# What an epoch may be for the server to put it in an id (``model.new_epoch`` makes 12 hex
# digits); a state with any other epoch gets ids without it.
EPOCH_PATTERN = re.compile(r"[A-Za-z0-9]{1,32}")
_JOB_MARKER = ',"epoch":"'
_JOB_ID = JOB_ID_PATTERN.pattern.removeprefix("^").removesuffix("$")

_V2 = rf"2\.[0-9]{{0,18}}(?:\.[A-Za-z0-9_-]{{{KEY_CHARS}}}[0-9]{{1,18}})*"
_V1 = rf"1,[0-9]{{0,18}}(?:,(?:{_JOB_ID}~[A-Za-z0-9]{{1,32}}~[0-9]{{1,18}})?)*"
# Everything a cursor may look like (published in the OpenAPI document, checked first).
CURSOR_PATTERN = re.compile(rf"{_V2}|{_V1}")
# Bounds checked before any other work: a version 2 entry is 1 + 8 + 18 characters at most;
# a version 1 entry (job id 128, epoch 32, seq 18, separators) 182.
_V2_ENTRY_CHARS = 1 + KEY_CHARS + MAX_SEQ_DIGITS
_V1_ENTRY_CHARS = 128 + 32 + 18 + 4

# The per-job stream's id: empty (no resume point), ``<seq>`` or ``<seq>.<epoch>``.
SEQ_RESUME_PATTERN = re.compile(r"(?:[0-9]{1,18}(?:\.[A-Za-z0-9]{1,32})?)?")


@dataclass(slots=True, frozen=True)
class Mark:
    """What a client has of one job: the state with this epoch and seq ("" when the resume
    point did not say which epoch)."""

    epoch: str
    seq: int


@dataclass(slots=True)
class Cursor:
    """A parsed cursor: marks by job id (version 1) or seqs by key (version 2)."""

    marks: dict[str, Mark] = field(default_factory=dict)
    keyed: dict[str, int] = field(default_factory=dict)
    watermark: int = 0

    @property
    def empty(self) -> bool:
        return not self.marks and not self.keyed

    def mark(self, job_id: str, epoch: str) -> Mark | None:
        """What the cursor says the client has of ``job_id`` in ``epoch`` (its current
        one), or None if it names no state of that job and epoch."""
        found = self.marks.get(job_id)
        if found is not None:
            return found
        seq = self.keyed.get(job_key(job_id, epoch))
        return None if seq is None else Mark(epoch, seq)


@functools.lru_cache(maxsize=16384)
def job_key(job_id: str, epoch: str) -> str:
    """The 8-character key of a job and epoch in a cursor (kept: every change of a job in
    one epoch has the same key, and hashing it costs more than the rest of the entry)."""
    digest = hashlib.blake2b(f"{epoch}\x00{job_id}".encode(), digest_size=6).digest()
    return base64.urlsafe_b64encode(digest).decode()


def entry(job_id: str, epoch: str, seq: int) -> str:
    """One job's part of a cursor, its separator first: ``.<key><seq>``."""
    return f".{job_key(job_id, epoch)}{seq}"


def format_cursor(watermark: int, entries: list[str]) -> str:
    return f"{VERSION}.{watermark or ''}" + "".join(entries)


_STARTS: dict[int, bytes] = {}


def cursor_start(watermark: int) -> bytes:
    """The cursor up to its first entry, as bytes: ``cursor_start(w) + b"".join(entries)``
    is ``format_cursor(w, entries)`` encoded (the streams of one process share a few
    watermarks at a time, so they are kept)."""
    start = _STARTS.get(watermark)
    if start is None:
        if len(_STARTS) > 1024:
            _STARTS.clear()
        start = _STARTS[watermark] = f"{VERSION}.{watermark or ''}".encode()
    return start


class Marks:
    """A multiplexed stream's cursor in parts: ``entries[0]`` is the start (``2.`` and the
    watermark), then one entry per job (``.<key><seq>``, or b"" while the cursor names no
    state of it), at the position ``slots`` gives. ``cursor`` is their join, kept until
    something changes (None: join again). A list joins several times faster than a dict's
    values, and a delivery only overwrites one slot."""

    __slots__ = ("cursor", "entries", "slots")

    def __init__(self) -> None:
        self.entries: list[bytes] = [cursor_start(0)]
        self.slots: dict[str, int] = {}
        self.cursor: bytes | None = None

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, job_id: str) -> bytes:
        slot = self.slots.get(job_id)
        return b"" if slot is None else self.entries[slot]

    def set(self, job_id: str, entry: bytes) -> None:
        slot = self.slots.get(job_id)
        if slot is None:
            self.slots[job_id] = len(self.entries)
            self.entries.append(entry)
        else:
            self.entries[slot] = entry
        self.cursor = None

    def setdefault(self, job_id: str, entry: bytes) -> None:
        if job_id not in self.slots:
            self.set(job_id, entry)

    def pop(self, job_id: str) -> None:
        slot = self.slots.pop(job_id, None)
        if slot is None:
            return
        del self.entries[slot]
        for other, at in self.slots.items():
            if at > slot:
                self.slots[other] = at - 1
        self.cursor = None

    def set_watermark(self, watermark: int) -> None:
        self.entries[0] = cursor_start(watermark)
        self.cursor = None

    def sort(self) -> None:
        """One order for the same jobs, so streams of the same jobs hold equal cursors."""
        ordered = sorted(self.slots)
        self.entries[1:] = [self.entries[self.slots[job_id]] for job_id in ordered]
        self.slots = {job_id: at for at, job_id in enumerate(ordered, 1)}
        self.cursor = None

    def joined(self) -> bytes:
        cursor = self.cursor
        if cursor is None:
            cursor = self.cursor = b"".join(self.entries)
        return cursor


MAX_MOVES = 1024  # moves kept per change: ~1 MB of events at most

# Where a change takes a cursor: (the job's entry before, the cursor after, the event's bytes
# as a detached stream writes them or None until one does).
Move = tuple[bytes, bytes, bytes | None]


class Moves:
    """The cursor moves of the change being delivered, shared by every stream whose cursor
    was the same before it: ``table`` maps the cursor before to the ``Move``.

    A change is handed to all its watchers one after the other (``Hub.dispatch``), and
    streams that watch the same jobs and are up to date hold equal cursors, so the first of
    them builds the new cursor (and the event's bytes) and the others reuse both. A move is
    reused only from the same cursor and the same old entry of the job: the cursor says which
    entries the stream has, the old entry which one the change replaces (none: it is added),
    so the cursor after is exactly the stream's own. Only the current change's moves are
    kept, and at most ``MAX_MOVES`` of them (then it starts over: a change watched by
    thousands of streams that share nothing does not hold a copy of every event it made).
    ``head`` is the change's event up to its cursor (``event:``, ``data:``, ``id: ``),
    ``entry`` its part of a cursor."""

    __slots__ = ("change", "entry", "head", "table")

    def __init__(self) -> None:
        self.change: object = None
        self.entry = b""
        self.head = b""
        self.table: dict[bytes, Move] = {}

    def begin(self, change: object, entry: bytes, body: bytes) -> None:
        """``change`` is being delivered now: ``entry`` is its part of a cursor, ``body``
        its event without the ``id:`` line."""
        self.change = change
        self.entry = entry
        self.head = body + b"id: "
        self.table = {}

    def keep(self, before: bytes, move: Move) -> None:
        """Remember ``move`` for the streams whose cursor is ``before``."""
        table = self.table
        if len(table) >= MAX_MOVES:
            table.clear()
        table[before] = move


_CHUNK_SIZES: dict[int, bytes] = {}


def chunk_size(size: int) -> bytes:
    """The line that starts a chunk of ``size`` bytes (kept: events have few sizes)."""
    line = _CHUNK_SIZES.get(size)
    if line is None:
        if len(_CHUNK_SIZES) > 4096:
            _CHUNK_SIZES.clear()
        line = _CHUNK_SIZES[size] = b"%x\r\n" % size
    return line


def epoch_of(state_json: str) -> str:
    """The top-level ``epoch`` of a state's JSON, without parsing it. The first
    ``,"epoch":"`` is the top-level key: it comes before metadata, and a quote inside an
    earlier string value is always escaped."""
    start = state_json.find(_JOB_MARKER)
    if start < 0:
        return ""
    start += len(_JOB_MARKER)
    return state_json[start : state_json.find('"', start)]


def event_id(seq: int, epoch: str) -> str:
    """The per-job stream's id of a state: ``<seq>.<epoch>``, or ``<seq>`` for an epoch
    that does not fit an id."""
    return f"{seq}.{epoch}" if EPOCH_PATTERN.fullmatch(epoch) else str(seq)


def parse_event_id(text: str) -> Mark | None:
    """A per-job stream's resume point, already checked against ``SEQ_RESUME_PATTERN``;
    None when empty."""
    if not text:
        return None
    seq, _, epoch = text.partition(".")
    return Mark(epoch, int(seq))


def parse_cursor(text: str, *, field: str, max_jobs: int) -> Cursor:
    """Parse a cursor the server made; anything else is refused with 422, naming ``field``."""
    # A follow=active stream's cursor names its open jobs (at most max_jobs) and as many
    # that ended recently; an explicit list's, at most max_jobs.
    max_entries = 2 * max_jobs
    per_entry = _V2_ENTRY_CHARS if text.startswith("2.") else _V1_ENTRY_CHARS
    if len(text) > 2 + MAX_SEQ_DIGITS + max_entries * per_entry:
        raise InvalidUpdate(field, f"is too long for a stream of at most {max_jobs} jobs")
    if not CURSOR_PATTERN.fullmatch(text):
        raise InvalidUpdate(
            field,
            "is not a cursor of GET /v1/events: send back the id of the last event received, "
            "unchanged (or leave it out to start from each job's current state)",
        )
    version = text[0]
    parts = text.split("." if version == "2" else ",")
    entries = [raw for raw in parts[2:] if raw]
    if len(entries) > max_entries:
        raise InvalidUpdate(field, f"names more than {max_entries} jobs")
    cursor = Cursor(watermark=int(parts[1]) if parts[1] else 0)
    # The server never names a job twice; if a cursor does, its last entry counts.
    if version == "2":
        for raw in entries:
            cursor.keyed[raw[:KEY_CHARS]] = int(raw[KEY_CHARS:])
    else:
        for raw in entries:
            job_id, epoch, seq = raw.split("~")
            cursor.marks[job_id] = Mark(epoch, int(seq))
    return cursor
