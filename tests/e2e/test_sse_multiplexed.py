"""``GET /v1/events``: many jobs on one SSE stream, resumed by an opaque cursor; and the
stream edges shared with the per-job route (token expiry, resume points the server cannot
honour, malformed resume points). Real server processes on each engine."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import REDIS_URL, engine_variants, module_server_on, private_prefix
from tests.support.clients import SSEEvent, sse_events
from tests.support.process import ServerProcess
from tests.support.redis_servers import wipe_store

from phasecast.server.sse_cursor import entry, format_cursor, job_key, parse_cursor

TERMINAL = {"COMPLETE", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module", params=engine_variants(("raw", "asgi")))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per engine and per SSE write path for the module: ``raw`` (bytes
    written to the socket, server/sse_transport.py) and ``asgi`` (every event through ASGI
    ``send``, as under any other ASGI server)."""
    engine, path = request.param
    env = {"PHASECAST_PING_INTERVAL": "1", "PHASECAST_SSE_TRANSPORT": path}
    with module_server_on(engine, tmp_path_factory.mktemp("server"), env) as process:
        yield process


@pytest.fixture
async def api(server: ServerProcess, worker_token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {worker_token}"}, timeout=10
    ) as client:
        yield client


async def new_job(api: httpx.AsyncClient, owner: str = "alice", job_id: str | None = None) -> str:
    job_id = job_id or f"mx-{uuid.uuid4().hex[:10]}"
    reply = await api.post("/v1/jobs", json={"job_id": job_id, "owner": owner})
    assert reply.status_code == 201, reply.text
    return job_id


async def report(api: httpx.AsyncClient, job_id: str, progress: float) -> int:
    reply = await api.post(
        f"/v1/jobs/{job_id}/progress", json={"phase": "ANALYZING", "phase_progress": progress}
    )
    assert reply.status_code == 200, reply.text
    seq: int = reply.json()["state"]["seq"]
    return seq


async def finish(api: httpx.AsyncClient, job_id: str, how: str = "complete") -> int:
    body: dict[str, Any] = {}
    if how == "fail":
        body = {"error": {"code": "boom", "message": "it broke"}}
    reply = await api.post(f"/v1/jobs/{job_id}/{how}", json=body)
    assert reply.status_code == 200, reply.text
    seq: int = reply.json()["state"]["seq"]
    return seq


class Stream:
    """An SSE stream read in the background; tests await conditions on what arrived."""

    def __init__(self, base_url: str, path: str, headers: dict[str, str] | None = None) -> None:
        self.items: list[SSEEvent | str] = []
        self.ended = False
        self.error: BaseException | None = None
        self._tick = asyncio.Event()
        self._client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10, read=60))
        self._task = asyncio.create_task(self._run(path, headers))

    async def _run(self, path: str, headers: dict[str, str] | None) -> None:
        try:
            async for item in sse_events(self._client, path, headers=headers):
                self.items.append(item)
                self._tick.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.ended = True
            self._tick.set()

    async def wait(self, predicate: Callable[[Stream], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self.ended:
                    raise AssertionError(f"stream ended first: {self.items!r} {self.error!r}")
                self._tick.clear()
                await self._tick.wait()

    async def wait_end(self, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._task)

    @property
    def events(self) -> list[SSEEvent]:
        return [item for item in self.items if isinstance(item, SSEEvent)]

    def states(self, job_id: str) -> list[dict[str, Any]]:
        return [
            e.json() for e in self.events if e.event == "state" and e.json()["job_id"] == job_id
        ]

    def seqs(self, job_id: str) -> list[int]:
        return [s["seq"] for s in self.states(job_id)]

    def has_seq(self, job_id: str, seq: int) -> bool:
        return seq in self.seqs(job_id)

    def errors(self) -> dict[str, dict[str, Any]]:
        return {e.json()["job_id"]: e.json() for e in self.events if e.event == "error"}

    @property
    def last_id(self) -> str:
        ids = [e.id for e in self.events if e.id]
        assert ids, "no event with an id yet"
        return ids[-1]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()


@pytest.fixture
async def streams() -> AsyncIterator[Callable[..., Stream]]:
    opened: list[Stream] = []

    def open_stream(base_url: str, path: str, headers: dict[str, str] | None = None) -> Stream:
        stream = Stream(base_url, path, headers)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        await stream.close()


def query(*job_ids: str, token: str, **extra: str) -> str:
    params = [("job", job_id) for job_id in job_ids] + [("access_token", token), *extra.items()]
    return "/v1/events?" + str(httpx.QueryParams(params))


# --- the happy path ----------------------------------------------------------------------


async def test_several_jobs_reach_their_terminal_states_on_one_stream(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    jobs = [await new_job(api) for _ in range(4)]
    stream = streams(server.url, query(*jobs, token=make_token("alice")))
    await stream.wait(lambda s: all(s.has_seq(j, 1) for j in jobs))
    expected: dict[str, list[int]] = {j: [1] for j in jobs}
    for step in range(1, 4):
        for job_id in jobs:
            seq = await report(api, job_id, step * 20)
            expected[job_id].append(seq)
            await stream.wait(lambda s, j=job_id, q=seq: s.has_seq(j, q))
    for job_id, how in zip(jobs, ["complete", "fail", "cancel", "complete"], strict=True):
        expected[job_id].append(await finish(api, job_id, how))
    await stream.wait_end()
    assert stream.error is None
    for job_id in jobs:
        assert stream.seqs(job_id) == expected[job_id]
        assert stream.states(job_id)[-1]["phase"] in TERMINAL
    kinds = [e.event for e in stream.events]
    assert kinds[-1] == "end" and kinds[:-1] == ["state"] * (len(kinds) - 1)
    # Every state carries a cursor, and each differs from the one before.
    ids = [e.id for e in stream.events if e.event == "state"]
    assert all(ids) and len(set(ids)) == len(ids)


async def test_resume_from_the_cursor_misses_nothing_and_repeats_nothing(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    # Ids of every length, up to the longest allowed (128 characters).
    tag = uuid.uuid4().hex
    jobs = [
        await new_job(api, job_id=f"m{tag[:4]}"),
        await new_job(api, job_id=("L" + tag * 4)[:128]),
        await new_job(api, job_id=f"mid-{tag}"),
    ]
    a, b, c = jobs
    first = streams(server.url, query(*jobs, token=make_token("alice")))
    await first.wait(lambda s: all(s.has_seq(j, 1) for j in jobs))
    for job_id in (a, b):
        seq = await report(api, job_id, 10)
        await first.wait(lambda s, j=job_id, q=seq: s.has_seq(j, q))
    cursor = first.last_id
    # The cursor grows with the number of jobs, not with their ids: no id is in it.
    assert len(cursor) <= 2 + 3 * (1 + 8 + 2), cursor
    assert not any(job_id in cursor for job_id in jobs)
    await first.close()  # the connection drops mid-way

    # While away: a moves once, b ends, c does not move.
    away_a = await report(api, a, 30)
    away_b = await finish(api, b)

    # Reconnect as a browser would: same URL, Last-Event-ID header.
    second = streams(server.url, query(*jobs, token=make_token("alice")), {"Last-Event-ID": cursor})
    await second.wait(lambda s: s.has_seq(a, away_a) and s.has_seq(b, away_b))
    assert second.seqs(c) == []  # nothing new for c: nothing sent
    more_c = await report(api, c, 50)
    await second.wait(lambda s: s.has_seq(c, more_c))
    cursor = second.last_id
    await second.close()

    # Again, as a client opening a new EventSource with a fresh token: ?last_event_id=.
    last_a = await finish(api, a)
    third = streams(server.url, query(*jobs, token=make_token("alice"), last_event_id=cursor))
    await third.wait(lambda s: s.has_seq(a, last_a))
    last_c = await finish(api, c, "cancel")
    await third.wait_end()
    assert third.seqs(b) == []  # b's terminal state was delivered before: not repeated
    for job_id in jobs:
        seen = first.seqs(job_id) + second.seqs(job_id) + third.seqs(job_id)
        history = (await api.get(f"/v1/jobs/{job_id}/history")).json()["events"]
        assert seen == [entry["seq"] for entry in history], job_id
    assert last_c == third.seqs(c)[-1]
    assert [e.event for e in third.events][-1] == "end"

    # A fourth reconnect has nothing left to send: 204, so an EventSource stops retrying.
    async with httpx.AsyncClient(base_url=server.url) as client:
        done = await client.get(
            query(*jobs, token=make_token("alice")), headers={"Last-Event-ID": third.last_id}
        )
    assert done.status_code == 204


async def test_a_job_resumed_without_news_stays_in_the_cursor(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    """A resumed stream sends nothing of a job the client is up to date with; every id it
    sends must still name that job, or the next resume would send its state again."""
    moving, still = await new_job(api), await new_job(api)
    first = streams(server.url, query(moving, still, token=make_token("alice")))
    await first.wait(lambda s: s.has_seq(moving, 1) and s.has_seq(still, 1))
    cursor = first.last_id
    await first.close()

    news = await report(api, moving, 10)
    second = streams(server.url, query(moving, still, token=make_token("alice")), {"Last-Event-ID": cursor})
    await second.wait(lambda s: s.has_seq(moving, news))
    assert second.seqs(still) == []
    cursor = second.last_id  # the id of an event of the other job only
    await second.close()

    third = streams(server.url, query(moving, still, token=make_token("alice")), {"Last-Event-ID": cursor})
    more = await report(api, moving, 20)
    # Whatever the resume sends comes before the live change: once that is in, it is all.
    await third.wait(lambda s: s.has_seq(moving, more))
    assert third.seqs(moving) == [more]
    assert third.seqs(still) == [], "the job the client was up to date with came again"


async def test_every_event_of_a_batch_carries_its_own_resume_point(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    # A batch report moves every job of the stream at once: the changes reach the stream
    # together, back to back. Each event's cursor must say exactly what the client has at
    # that event: resuming from any of them sends each job its newest state if and only if
    # the client did not have it yet.
    jobs = [await new_job(api) for _ in range(6)]
    token = make_token("alice")
    stream = streams(server.url, query(*jobs, token=token))
    await stream.wait(lambda s: all(s.has_seq(j, 1) for j in jobs))
    latest: dict[str, int] = {}
    for step in range(1, 5):
        reply = await api.post(
            "/v1/progress",
            json={"updates": [{"job_id": j, "phase": "ANALYZING", "phase_progress": step * 20} for j in jobs]},
        )
        assert reply.status_code == 200, reply.text
        latest = {j: (await api.get(f"/v1/jobs/{j}")).json()["seq"] for j in jobs}
        await stream.wait(lambda s, now=latest: all(s.has_seq(j, q) for j, q in now.items()))
    events = [e for e in stream.events if e.event == "state"]
    for job_id in jobs:
        seqs = stream.seqs(job_id)
        assert seqs == sorted(set(seqs)) and seqs[-1] == latest[job_id]
    for index in (0, len(events) // 3, len(events) // 2, len(events) - 2, len(events) - 1):
        had: dict[str, int] = {}
        for event in events[: index + 1]:
            had[event.json()["job_id"]] = event.json()["seq"]
        resumed = streams(server.url, query(*jobs, token=token), {"Last-Event-ID": events[index].id or ""})
        owed = {j for j in jobs if had.get(j, 0) < latest[j]}
        await resumed.wait(lambda s, o=owed: all(s.has_seq(j, latest[j]) for j in o))
        await resumed.wait(lambda s: any(item == ": ping" for item in s.items))  # nothing more
        for job_id in jobs:
            assert resumed.seqs(job_id) == ([latest[job_id]] if job_id in owed else []), (index, job_id)
        await resumed.close()


def named(cursor_text: str) -> dict[str, int]:
    """The seq a cursor names per key."""
    return dict(parse_cursor(cursor_text, field="id", max_jobs=100).keyed)


async def test_streams_of_the_same_jobs_share_cursors_and_each_id_is_still_its_own(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    # Streams whose cursors are equal share the work of each change (one builds the new
    # cursor, the others reuse it). Streams out of step with them (other jobs, a resume,
    # jobs named in another order) must still get ids that name exactly what each has.
    a, b, c = [await new_job(api) for _ in range(3)]
    token = make_token("alice")
    alike = [streams(server.url, query(a, b, token=token)) for _ in range(3)]
    reordered = streams(server.url, query(b, a, token=token))
    wider = streams(server.url, query(a, b, c, token=token))
    for stream in (*alike, reordered, wider):
        await stream.wait(lambda s: s.has_seq(a, 1) and s.has_seq(b, 1))
    moved = await report(api, a, 10)
    for stream in (*alike, reordered, wider):
        await stream.wait(lambda s: s.has_seq(a, moved))
    # Resumed from an id that names a@1 and b@1 only: it has a newer a than that cursor says.
    resumed = streams(
        server.url, query(a, b, token=token), {"Last-Event-ID": alike[0].events[1].id or ""}
    )
    await resumed.wait(lambda s: s.has_seq(a, moved))
    everyone = (*alike, reordered, wider, resumed)
    latest: dict[str, int] = {}
    for step in range(2, 6):
        for job_id in (a, b, c):
            latest[job_id] = await report(api, job_id, step * 15)
        for stream in everyone:
            await stream.wait(lambda s: all(s.has_seq(j, latest[j]) for j in (a, b)))
    epoch = {j: (await api.get(f"/v1/jobs/{j}")).json()["epoch"] for j in (a, b, c)}
    resume_point = named(alike[0].events[1].id or "")
    for stream in everyone:
        has: dict[str, int] = {}
        if stream is resumed:
            has = {j: q for j in (a, b) if (q := resume_point.get(job_key(j, epoch[j]), 0))}
        for event in stream.events:
            state = event.json()
            has[state["job_id"]] = state["seq"]
            assert event.id is not None
            assert named(event.id) == {job_key(j, epoch[j]): q for j, q in has.items()}, event
    ids = {stream.last_id for stream in alike}
    assert len(ids) == 1 and {reordered.last_id} == ids  # same jobs, same cursor


async def test_jobs_that_cannot_be_watched_get_error_events_and_the_rest_goes_on(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    mine = await new_job(api, "alice")
    theirs = await new_job(api, "bob")
    unknown = f"nope-{uuid.uuid4().hex[:8]}"
    stream = streams(server.url, query(theirs, mine, unknown, token=make_token("alice")))
    await stream.wait(lambda s: s.has_seq(mine, 1) and len(s.errors()) == 2)
    errors = stream.errors()
    assert errors[theirs]["code"] == "forbidden"
    assert errors[unknown]["code"] == "not_found"
    assert all(errors[j]["message"] for j in (theirs, unknown))
    await report(api, theirs, 40)  # never reaches alice
    last = await finish(api, mine)
    await stream.wait_end()
    assert stream.seqs(mine) == [1, last]
    assert stream.states(theirs) == []
    assert [e.event for e in stream.events][-1] == "end"


@pytest.mark.parametrize(
    ("params", "headers", "status", "field"),
    [
        ({}, {}, 422, "job"),
        ({"job": "bad id"}, {}, 422, "job"),
        ({"job": "x\n"}, {}, 422, "job"),
        ({"job": "a", "follow": "active"}, {}, 422, "follow"),
        ({"follow": "everything"}, {}, 422, "follow"),
        ({"job": "a"}, {"Last-Event-ID": "17"}, 422, "Last-Event-ID"),
        ({"job": "a"}, {"Last-Event-ID": "1,,a~e~x"}, 422, "Last-Event-ID"),
        ({"job": "a", "last_event_id": "null"}, {}, 422, "last_event_id"),
        ({"job": "a"}, {"Last-Event-ID": "null"}, 422, "Last-Event-ID"),
        # Both resume points are checked, though the header wins.
        ({"job": "a", "last_event_id": "1,,a~e~x"}, {"Last-Event-ID": "1,,a~e~1"}, 422, "last_event_id"),
        ({"job": "a", "last_event_id": "2,,a~e~1"}, {}, 422, "last_event_id"),
    ],
)
async def test_malformed_requests_get_their_documented_4xx(
    server: ServerProcess, make_token: Callable[..., str],
    params: dict[str, str], headers: dict[str, str], status: int, field: str,
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        reply = await client.get(
            "/v1/events", params={**params, "access_token": make_token("alice")}, headers=headers
        )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid"
    assert field in error.get("field", ""), error


@pytest.mark.parametrize("route", ["multiplexed", "per-job"])
@pytest.mark.parametrize("where", ["header", "query"])
async def test_an_empty_resume_point_is_none_and_a_malformed_one_is_refused(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream], route: str, where: str,
) -> None:
    job_id = await new_job(api)
    await report(api, job_id, 0.5)
    last = await finish(api, job_id)
    token = make_token("alice")
    path = f"/v1/events?job={job_id}" if route == "multiplexed" else f"/v1/jobs/{job_id}/events?x=1"
    name = "Last-Event-ID" if where == "header" else "last_event_id"

    def resume(value: str) -> tuple[str, dict[str, str]]:
        if where == "header":
            return f"{path}&access_token={token}", {"Last-Event-ID": value}
        return f"{path}&access_token={token}&last_event_id={value}", {}

    # Empty: the stream starts from the current state (here the terminal one) and ends.
    stream = streams(server.url, *resume(""))
    await stream.wait_end()
    assert stream.seqs(job_id) == [last]
    # Not a resume point of this route (schema pattern): 422 naming where it came from.
    for bad in ("null", "-1", "1,,a~e~1" if route == "per-job" else "7"):
        url, headers = resume(bad)
        async with httpx.AsyncClient(base_url=server.url) as client:
            reply = await client.get(url, headers=headers)
        assert reply.status_code == 422, (bad, reply.text)
        assert reply.json()["error"]["field"] == name
    # Both are checked, though the header wins: a malformed query is refused beside a good header.
    good = "1" if route == "per-job" else "1,,"
    async with httpx.AsyncClient(base_url=server.url) as client:
        reply = await client.get(
            f"{path}&access_token={token}&last_event_id=null", headers={"Last-Event-ID": good}
        )
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["field"] == "last_event_id"


async def test_refusals_before_the_stream_starts(
    server: ServerProcess, make_token: Callable[..., str]
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        missing = await client.get("/v1/events", params={"job": "a"})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        scope = make_token("alice", ("billing:read",))
        refused = await client.get("/v1/events", params={"job": "a", "access_token": scope})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        too_many = await client.get(
            "/v1/events",
            params=[("job", f"j{i}") for i in range(101)] + [("access_token", make_token())],
        )
        assert too_many.status_code == 422 and "at most 100" in too_many.json()["error"]["message"]


# --- credentials expire on the stream ----------------------------------------------------


@pytest.mark.parametrize("route", ["multiplexed", "per-job"])
async def test_the_stream_ends_at_the_token_expiry_and_resumes_with_a_fresh_token(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream], route: str,
) -> None:
    job_id = await new_job(api)
    short = make_token("alice", ttl=3)

    def path(token: str, **extra: str) -> str:
        if route == "multiplexed":
            return query(job_id, token=token, **extra)
        return f"/v1/jobs/{job_id}/events?" + str(httpx.QueryParams({"access_token": token, **extra}))

    stream = streams(server.url, path(short))
    await stream.wait(lambda s: s.has_seq(job_id, 1))
    seq = await report(api, job_id, 30)
    await stream.wait(lambda s: s.has_seq(job_id, seq))
    await stream.wait_end(timeout=10)  # ends by itself, at the expiry
    last = stream.events[-1]
    assert last.event == "expired"
    assert last.json()["code"] == "token_expired"
    # Nothing was written after the expiry notice, and the stream did carry states before.
    assert stream.seqs(job_id) == [1, seq]

    moved = await report(api, job_id, 60)
    resumed = streams(server.url, path(make_token("alice"), last_event_id=stream.last_id))
    await resumed.wait(lambda s: s.has_seq(job_id, moved))
    final = await finish(api, job_id)
    await resumed.wait_end()
    assert resumed.seqs(job_id) == [moved, final]


async def test_an_expired_token_is_refused_before_the_stream_starts(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    job_id = await new_job(api)
    expired = make_token("alice", ttl=-120)  # beyond the server's leeway
    async with httpx.AsyncClient(base_url=server.url) as client:
        for path in (f"/v1/jobs/{job_id}/events", "/v1/events"):
            reply = await client.get(path, params={"job": job_id, "access_token": expired})
            assert reply.status_code == 401, (path, reply.text)


# --- resume points the server cannot honour ----------------------------------------------


@pytest.mark.parametrize(
    ("route", "with_epoch"), [("multiplexed", True), ("per-job", True), ("per-job", False)]
)
async def test_a_resume_point_beyond_the_current_seq_gets_the_full_state_and_ends(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream], route: str, with_epoch: bool,
) -> None:
    # A client that saw seq 5 of a job, which is now at seq 2 (a store that lost changes
    # the client had seen). A client never builds a resume point; this test does, to have
    # one the server cannot honour.
    token = make_token("alice")
    job_id = await new_job(api)
    await report(api, job_id, 10)
    epoch = (await api.get(f"/v1/jobs/{job_id}")).json()["epoch"]
    if route == "multiplexed":
        resume = format_cursor(0, [entry(job_id, epoch, 5)])
        path = query(job_id, token=token)
    else:
        resume = f"5.{epoch}" if with_epoch else "5"  # a bare seq: the id written before
        path = f"/v1/jobs/{job_id}/events?access_token={token}"
    stream = streams(server.url, path, {"Last-Event-ID": resume})
    await stream.wait(lambda s: s.has_seq(job_id, 2))
    seq = await report(api, job_id, 50)
    await stream.wait(lambda s: s.has_seq(job_id, seq))
    final = await finish(api, job_id)
    await stream.wait_end()  # ends after the terminal state, as any stream
    assert stream.seqs(job_id) == [2, seq, final]


@pytest.fixture
def own_server(engine_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        engine_url, env={"PHASECAST_PING_INTERVAL": "1"}, log_path=tmp_path / "server.log"
    )
    with process:
        yield process


async def test_a_cursor_from_another_epoch_gets_the_full_state_after_a_store_loss(
    own_server: ServerProcess, engine_url: str, worker_token: str,
    make_token: Callable[..., str], streams: Callable[..., Stream],
) -> None:
    server = own_server
    token = make_token("alice")
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {worker_token}"}
    ) as api:
        moving, done = await new_job(api), await new_job(api)
        for job_id in (moving, done):
            await report(api, job_id, 10)
            await report(api, job_id, 20)
        stream = streams(server.url, query(moving, done, token=token))
        await stream.wait(lambda s: s.has_seq(moving, 3) and s.has_seq(done, 3))
        cursor = stream.last_id
        old_epoch = stream.states(moving)[-1]["epoch"]
        await stream.close()
        # The per-job route's id carries the epoch too.
        single = streams(server.url, f"/v1/jobs/{done}/events?access_token={token}")
        await single.wait(lambda s: s.has_seq(done, 3))
        single_id = single.last_id
        assert single_id == f"3.{single.states(done)[-1]['epoch']}"
        await single.close()

    # The store is lost; the jobs are made again under the same ids, with new epochs, and
    # reach the very seqs the client has (3): a seq-only resume would send nothing.
    server.stop()
    wipe_store(engine_url)
    server.start()
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {worker_token}"}
    ) as api:
        for job_id in (moving, done):
            await new_job(api, job_id=job_id)
            await report(api, job_id, 5)
        third = await finish(api, done)
        assert third == 3
        await report(api, moving, 50)
        resumed = streams(server.url, query(moving, done, token=token), {"Last-Event-ID": cursor})
        # Per job: the remade job's terminal state, though its seq is the one the client
        # had (a seq-only resume would answer 204 and the client would never see it).
        again = streams(
            server.url, f"/v1/jobs/{done}/events?access_token={token}", {"Last-Event-ID": single_id}
        )
        await again.wait_end()
        assert again.seqs(done) == [3] and again.states(done)[0]["phase"] == "COMPLETE"
        await resumed.wait(lambda s: s.has_seq(moving, 3) and s.has_seq(done, 3))
        assert resumed.states(moving)[-1]["epoch"] != old_epoch
        assert resumed.states(done)[-1]["phase"] == "COMPLETE"
        final = await finish(api, moving)
        await resumed.wait_end()
        assert resumed.seqs(moving) == [3, final]
        assert resumed.seqs(done) == [3]


async def test_a_version_1_cursor_still_resumes_every_job(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    # A client that reconnects across the upgrade sends the cursor the old server wrote:
    # 1,<watermark>,<job_id>~<epoch>~<seq>,…
    jobs = [await new_job(api) for _ in range(2)]
    a, b = jobs
    seen = {job_id: [await report(api, job_id, 10)] for job_id in jobs}
    epochs = {job_id: (await api.get(f"/v1/jobs/{job_id}")).json()["epoch"] for job_id in jobs}
    legacy = "1,," + ",".join(f"{j}~{epochs[j]}~{seen[j][-1]}" for j in jobs)
    moved = await report(api, a, 40)
    stream = streams(server.url, query(*jobs, token=make_token("alice")), {"Last-Event-ID": legacy})
    await stream.wait(lambda s: s.has_seq(a, moved))
    final = await finish(api, b)
    await stream.wait(lambda s: s.has_seq(b, final))
    assert stream.seqs(a) == [moved] and stream.seqs(b) == [final]
    assert stream.last_id.startswith("2.")  # new events carry the new cursor


async def test_hostile_cursors_are_refused_or_resync_never_skip(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    jobs = [await new_job(api) for _ in range(2)]
    token = make_token("alice")
    async with httpx.AsyncClient(base_url=server.url) as client:
        for bad in (
            "2." + "9" * 19,  # a watermark of 19 digits
            "2..AAAAAAAA" + "9" * 19,  # a seq of 19 digits
            "2..AAAA$AAA1",
            "2.." + ".".join(f"{i:08}1" for i in range(201)),  # 2 x 100 entries at most
            "2.." + "A" * 20_000,  # far too long: refused before it is matched
            "2,,AAAAAAAA1",
        ):
            for where in ("header", "query"):
                reply = await client.get(
                    query(*jobs, token=token, **({"last_event_id": bad} if where == "query" else {})),
                    headers={"Last-Event-ID": bad} if where == "header" else {},
                )
                assert reply.status_code == 422, (bad[:40], where, reply.text)
                error = reply.json()["error"]
                assert error["field"] == ("Last-Event-ID" if where == "header" else "last_event_id")
    # A well-formed cursor whose keys name none of the stream's jobs (forged, or from
    # another stream) is a cursor that names nothing: every job starts from its current
    # state.
    forged = "2..AAAAAAAA99.BBBBBBBB99"
    stream = streams(server.url, query(*jobs, token=token), {"Last-Event-ID": forged})
    await stream.wait(lambda s: all(s.has_seq(j, 1) for j in jobs))


# --- follow=active -----------------------------------------------------------------------


async def test_follow_active_streams_the_callers_active_jobs_and_new_ones(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    me = f"follower-{uuid.uuid4().hex[:6]}"
    running = [await new_job(api, me) for _ in range(2)]
    ended = await new_job(api, me)
    await finish(api, ended)
    other = await new_job(api, "someone-else")
    token = make_token(me)
    stream = streams(server.url, f"/v1/events?follow=active&access_token={token}")
    await stream.wait(lambda s: all(s.has_seq(j, 1) for j in running))
    created = await new_job(api, me)  # created while the stream is open
    await stream.wait(lambda s: s.has_seq(created, 1))
    for job_id in [*running, created]:
        seq = await finish(api, job_id)
        await stream.wait(lambda s, j=job_id, q=seq: s.has_seq(j, q))
    await stream.wait(lambda s: ": ping" in s.items[-1:])  # open still, though all ended
    assert stream.states(ended) == [] and stream.states(other) == []
    cursor = stream.last_id
    await stream.close()

    # Away: a job is created and ends. On resume it arrives; what was delivered does not.
    missed = await new_job(api, me)
    missed_final = await finish(api, missed)
    later = streams(server.url, f"/v1/events?follow=active&access_token={token}",
                    {"Last-Event-ID": cursor})
    await later.wait(lambda s: s.has_seq(missed, missed_final))
    fresh = await new_job(api, me)
    await later.wait(lambda s: s.has_seq(fresh, 1))
    assert later.seqs(missed) == [missed_final]
    for job_id in [*running, created, ended, other]:
        assert later.seqs(job_id) == []


# --- a reader that stops reading ---------------------------------------------------------


async def test_a_stalled_reader_gets_the_newest_states_in_order_once_it_reads_again(
    server: ServerProcess, api: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    # Large states (~10 KB) fill the socket buffers quickly; the server must then hold at
    # most the newest state per job (latest wins) and deliver in order when the reader
    # comes back, the terminal state last.
    jobs = []
    for _ in range(2):
        job_id = f"mx-{uuid.uuid4().hex[:10]}"
        reply = await api.post(
            "/v1/jobs", json={"job_id": job_id, "owner": "alice", "metadata": {"n": "x" * 10_000}}
        )
        assert reply.status_code == 201, reply.text
        jobs.append(job_id)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    path = query(*jobs, token=make_token("alice"))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    updates = 300
    for index in range(updates):
        await asyncio.gather(*(report(api, job_id, min(99.0, index / 3)) for job_id in jobs))
    finals = {job_id: await finish(api, job_id) for job_id in jobs}
    async with asyncio.timeout(30):
        body = await reader.read(-1)  # to the end: the stream ends after both terminal states
    writer.close()
    text = b"".join(_dechunk(body)).decode()
    seqs: dict[str, list[int]] = {job_id: [] for job_id in jobs}
    for block in text.split("\n\n"):
        if "event: state" in block:
            data = json.loads(block.split("data: ", 1)[1].split("\n", 1)[0])
            seqs[data["job_id"]].append(data["seq"])
    for job_id in jobs:
        got = seqs[job_id]
        assert got == sorted(set(got)), got  # strictly increasing
        assert got[-1] == finals[job_id]
        assert len(got) < updates  # conflated while stalled, not queued
    assert "event: end" in text


def _dechunk(body: bytes) -> list[bytes]:
    """The payload of a chunked HTTP/1.1 body, chunk by chunk."""
    out: list[bytes] = []
    offset = 0
    while True:
        line_end = body.index(b"\r\n", offset)
        size = int(body[offset:line_end], 16)
        if size == 0:
            return out
        out.append(body[line_end + 2 : line_end + 2 + size])
        offset = line_end + 2 + size + 2


@pytest.mark.redis
async def test_follow_active_picks_up_a_job_created_through_another_instance(
    tmp_path: Path, worker_token: str, make_token: Callable[..., str],
    streams: Callable[..., Stream],
) -> None:
    # The observer only sees writes of its own process; the next scan (one heartbeat
    # interval, 1 s here) finds jobs created elsewhere, also one that ended meanwhile.
    me = f"follower-{uuid.uuid4().hex[:6]}"
    with private_prefix() as prefix:
        url = f"{REDIS_URL}?prefix={prefix}"
        env = {"PHASECAST_PING_INTERVAL": "1"}
        with (
            ServerProcess(url, env=env, log_path=tmp_path / "a.log") as watched,
            ServerProcess(url, env=env, log_path=tmp_path / "b.log") as other,
        ):
            stream = streams(watched.url, f"/v1/events?follow=active&access_token={make_token(me)}")
            await stream.wait(lambda s: any(item == ": ping" for item in s.items))
            async with httpx.AsyncClient(
                base_url=other.url, headers={"Authorization": f"Bearer {worker_token}"}
            ) as api:
                running = await new_job(api, me)
                brief = await new_job(api, me)
                brief_final = await finish(api, brief)
                await stream.wait(lambda s: s.has_seq(running, 1) and s.has_seq(brief, brief_final))
                seq = await report(api, running, 50)
                await stream.wait(lambda s: s.has_seq(running, seq))
            # Its final state, and nothing twice (its first state too, if a scan fell
            # between its creation and its end).
            assert stream.seqs(brief) in ([brief_final], [1, brief_final])
