"""``phasecast.client.PhasecastClient`` against real server processes: every state to the
terminal one, ``wait``, resumption across a SIGKILL and restart, token refresh with tokens
that live a few seconds, refusals, and the SSE fallback behind a proxy that refuses
WebSocket upgrades."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from tests.support.process import ServerProcess, free_port, sockets_to
from tests.support.redis_servers import wipe_store

from phasecast.client import (
    AuthenticationError,
    ConnectionFailedError,
    ForbiddenError,
    JobNotFoundError,
    JobState,
    PhasecastClient,
    RetryPolicy,
)
from phasecast.client.links import LinkDown, Outcome, SSELink
from phasecast.client.tokens import Token
from phasecast.engines import open_engine
from phasecast.model import Phase, ProgressUpdate
from phasecast.tracker import ProgressTracker

TRANSPORTS = ["websocket", "sse"]
# Reconnect quickly: these tests restart servers and must not wait out long backoffs.
FAST = RetryPolicy(base_delay=0.05, max_delay=0.5, give_up_after=90)


def new_id() -> str:
    return f"pyc-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def writer(url: str, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
        yield api


async def progress(api: httpx.AsyncClient, job_id: str, value: float, phase: str = "GENERATING") -> int:
    reply = await api.post(f"/v1/jobs/{job_id}/progress", json={"phase": phase, "phase_progress": value})
    assert reply.status_code == 200, reply.text
    seq: int = reply.json()["state"]["seq"]
    return seq


class Watching:
    """A watch running in a task, its states kept and announced as they arrive."""

    def __init__(self, client: PhasecastClient, job_id: str) -> None:
        self.job_id = job_id
        self.states: list[JobState] = []
        self._arrived = asyncio.Condition()
        self.task = asyncio.create_task(self._run(client, job_id))

    async def _run(self, client: PhasecastClient, job_id: str) -> None:
        try:
            async for state in client.watch(job_id):
                async with self._arrived:
                    self.states.append(state)
                    self._arrived.notify_all()
        finally:
            async with self._arrived:
                self._arrived.notify_all()

    async def seq(self, seq: int, timeout: float = 45) -> None:
        async with asyncio.timeout(timeout), self._arrived:
            while not (self.states and self.states[-1].seq >= seq):
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"the watch ended at {self.seqs()} before seq {seq}")
                await self._arrived.wait()

    async def end(self, timeout: float = 45) -> list[JobState]:
        await asyncio.wait_for(self.task, timeout)
        return self.states

    def seqs(self) -> list[int]:
        return [s.seq for s in self.states]


async def report_for(api: httpx.AsyncClient, watching: Watching, seconds: float, step: float) -> list[int]:
    """Report the watched job's progress (``step`` more each time, 99 at most) every 0.25 s
    for ``seconds``, each report waited for until the watch has it, then complete the job.
    Returns the seqs the watch must have yielded before the terminal state."""
    await watching.seq(1)
    expected = [1]
    started = time.monotonic()
    value = 0.0
    while time.monotonic() - started < seconds:
        value = min(99.0, value + step)
        expected.append(await progress(api, watching.job_id, value))
        await watching.seq(expected[-1])
        await asyncio.sleep(0.25)
    await api.post(f"/v1/jobs/{watching.job_id}/complete", json={})
    return expected


def strictly_increasing(seqs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(seqs))


# --- watch and wait --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_watch_yields_every_state_then_ends_after_the_terminal_one(
    module_server: ServerProcess, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    job = f"{new_id()}:comic.v2_x"  # every character class a job id may have
    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        async with PhasecastClient(module_server.url, token=make_token("alice"), transports=(transport,)) as client:
            watching = Watching(client, job)
            await watching.seq(1)
            expected = [1]
            # Each change waits until the previous one arrived, so none is conflated away.
            for phase, value in [("ANALYZING", 50), ("GENERATING", 10), ("GENERATING", 60), ("POST_PROCESSING", 30)]:
                expected.append(await progress(api, job, value, phase))
                await watching.seq(expected[-1])
            done = await api.post(f"/v1/jobs/{job}/complete", json={"message": "ready"})
            expected.append(done.json()["state"]["seq"])
            states = await watching.end()
    assert [s.seq for s in states] == expected
    assert [s.phase for s in states] == [
        Phase.QUEUED, Phase.ANALYZING, Phase.GENERATING, Phase.GENERATING, Phase.POST_PROCESSING, Phase.COMPLETE
    ]
    assert states[2].phase_progress == 10.0
    assert states[-1].progress == 100.0
    assert states[-1].message == "ready"
    assert client.stats.links[transport] == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wait_returns_the_terminal_state_of_a_finished_job_at_once(
    module_server: ServerProcess, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    failed, done = new_id(), new_id()
    async with writer(module_server.url, worker_token) as api:
        for job in (failed, done):
            await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        await api.post(f"/v1/jobs/{failed}/fail", json={"error": {"code": "gpu_oom", "message": "CUDA out of memory"}})
        await api.post(f"/v1/jobs/{done}/complete", json={})
        stored = (await api.get(f"/v1/jobs/{done}")).json()
    async with PhasecastClient(module_server.url, token=make_token("alice"), transports=(transport,)) as client:
        final = await asyncio.wait_for(client.wait(failed), 5)
        assert final.phase is Phase.FAILED
        assert final.error is not None
        assert final.error.code == "gpu_oom"
        completed = await asyncio.wait_for(client.wait(done), 5)
        assert completed.to_dict() == stored
        assert (await client.get(done)).to_dict() == stored


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refusals_end_the_watch_with_an_error_that_says_why(
    module_server: ServerProcess, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    job = new_id()
    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "bob"})
    url, only = module_server.url, (transport,)
    async with PhasecastClient(url, token=make_token("alice"), transports=only, retry=FAST) as client:
        with pytest.raises(JobNotFoundError):
            await asyncio.wait_for(client.wait(new_id()), 10)
        with pytest.raises(ForbiddenError):
            await asyncio.wait_for(client.wait(job), 10)
        with pytest.raises(ValueError, match="invalid job id"):
            await client.wait("bad\n")
    expired = make_token("alice", ttl=-60)
    async with PhasecastClient(url, token=expired, transports=only, retry=FAST) as client:
        with pytest.raises(AuthenticationError, match="token"):
            await asyncio.wait_for(client.wait(job), 10)
    calls = 0

    def always_expired() -> str:
        nonlocal calls
        calls += 1
        return expired

    # A token function is asked once more after a refusal; a second refusal is final.
    async with PhasecastClient(url, token=always_expired, transports=only, retry=FAST) as client:
        with pytest.raises(AuthenticationError, match="freshly obtained"):
            await asyncio.wait_for(client.wait(job), 10)
    assert calls == 2


# --- resumption --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_watch_resumes_after_the_server_is_killed_and_restarted(
    server: ServerProcess, engine_url: str, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    job = new_id()
    async with writer(server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        first = await progress(api, job, 20, "ANALYZING")
    async with PhasecastClient(server.url, token=make_token("alice"), transports=(transport,), retry=FAST) as client:
        watching = Watching(client, job)
        await watching.seq(first)
        server.kill()
        # While the server is down the job moves on (another process writing to the same
        # engine); the watch must pick that change up after the restart.
        async with ProgressTracker(open_engine(engine_url)) as tracker:
            while_down = await tracker.update(job, ProgressUpdate(phase=Phase.GENERATING, phase_progress=40))
        assert while_down.applied
        await asyncio.to_thread(server.start)
        await watching.seq(while_down.state.seq)
        async with writer(server.url, worker_token) as api:
            after = await progress(api, job, 80)
            await watching.seq(after)
            await api.post(f"/v1/jobs/{job}/complete", json={})
        states = await watching.end()
    seqs = [s.seq for s in states]
    assert strictly_increasing(seqs)
    assert {first, while_down.state.seq, after} <= set(seqs)
    assert states[-1].phase is Phase.COMPLETE
    assert client.stats.reconnects >= 1
    assert client.stats.links[transport] >= 2


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_job_made_again_after_a_store_loss_ends_the_watch_with_its_terminal_state(
    server: ServerProcess, engine_url: str, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    """The store is lost while a watch has seq 3; the job is made again (a new epoch) and
    ends at that very seq, so a resume point of a seq alone has nothing after it. Both
    transports resume with the epoch they have (the WebSocket's ``epoch``, SSE's
    ``last_event_id=<seq>.<epoch>``), so the server sends the new epoch's state in full and
    the watch ends with it. (A seq alone gets 204 on SSE; the next test covers that.)"""
    job = new_id()
    async with writer(server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        await progress(api, job, 10, "ANALYZING")
        assert await progress(api, job, 20, "ANALYZING") == 3
    async with PhasecastClient(server.url, token=make_token("alice"), transports=(transport,), retry=FAST) as client:
        watching = Watching(client, job)
        await watching.seq(3)
        server.kill()
        wipe_store(engine_url)
        async with ProgressTracker(open_engine(engine_url)) as tracker:
            await tracker.create(owner="alice", job_id=job)
            await tracker.report(job, Phase.ANALYZING, 50)
            remade = (await tracker.complete(job, "made again")).state
        assert remade.seq == 3
        await asyncio.to_thread(server.start)
        states = await watching.end()
        # wait() on the same job now: one link, the terminal state at once (since=0).
        assert (await asyncio.wait_for(client.wait(job), 10)).to_dict() == remade.to_dict()
    assert [s.seq for s in states] == [3, 3]
    assert states[0].epoch != remade.epoch
    assert states[-1].to_dict() == remade.to_dict()
    assert client.stats.reconnects >= 1


async def test_sse_resume_point_at_the_terminal_state_ends_the_watch_not_an_error(
    module_server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    """The per-job SSE link resumed at the terminal seq gets 204 from the server: the link
    reports the watch ended (``Outcome.ENDED``), not a rejection the policy turns into an
    error."""
    job = new_id()
    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        final = (await api.post(f"/v1/jobs/{job}/complete", json={})).json()["state"]["seq"]
        async with httpx.AsyncClient(base_url=module_server.url) as http:
            link = SSELink(http, job, final, Token(make_token("alice"), time.time(), None), open_timeout=5, idle_timeout=10)
            with pytest.raises(LinkDown) as ended:
                async for _ in link.events():
                    pass
            await link.close()
    assert ended.value.outcome is Outcome.ENDED
    assert ended.value.status == 204


# --- closing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_link_is_closed_by_the_time_the_watch_ends(
    module_server: ServerProcess, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    """When ``wait`` returns (the watch ended at the terminal state), the link's socket is
    already closed, not left to a close that asyncio schedules once the garbage collector
    finds the link: a loop stopping first left that socket open."""
    job = new_id()
    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        await api.post(f"/v1/jobs/{job}/complete", json={})
    before = sockets_to(module_server.port)
    async with PhasecastClient(module_server.url, token=make_token("alice"), transports=(transport,)) as client:
        assert (await client.wait(job)).phase is Phase.COMPLETE
        assert sockets_to(module_server.port) - before == set()
        # Many watches, one after the other: none leaves a socket behind.
        for _ in range(5):
            await client.wait(job)
        assert sockets_to(module_server.port) - before == set()
    assert client.stats.links[transport] == 6


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_watch_left_with_break_is_closed_when_the_client_closes(
    module_server: ServerProcess, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    """``break`` out of ``async for`` leaves the watch's generator suspended, and Python
    does not close it: its connection stayed open until the garbage collector found it
    (never, while anything held it). The client closes such watches when it closes."""
    job = new_id()
    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
    before = sockets_to(module_server.port)
    client = PhasecastClient(module_server.url, token=make_token("alice"), transports=(transport,))
    async with client:
        watches = [client.watch(job) for _ in range(2)]  # held: never collected meanwhile
        for watch in watches:
            async for state in watch:
                assert state.seq == 1
                break
        assert len(sockets_to(module_server.port) - before) == 2  # both links still open
    assert sockets_to(module_server.port) - before == set()
    for watch in watches:  # closed: nothing more comes
        with pytest.raises(StopAsyncIteration):
            await anext(watch)


async def test_a_watch_cancelled_during_its_closing_handshake_drops_the_connection(
    module_server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    """A watch is cancelled, and cancelled again while its WebSocket waits for the server to
    answer the close (what an event loop shutting down does to a close in progress): the
    client drops the TCP connection at once. Here the answer never comes (the proxy
    swallows the close frame), so a socket not dropped would stay open for good."""
    job = new_id()
    async with Proxy(module_server.port) as proxy, writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        async with PhasecastClient(proxy.url, token=make_token("alice"), transports=("websocket",)) as client:
            watching = Watching(client, job)
            await watching.seq(1)
            proxy.swallow()
            watching.task.cancel()
            await asyncio.wait_for(proxy.swallowed.wait(), 10)  # the close frame, sent and dropped
            assert not watching.task.done()  # still waiting for the server's close frame
            watching.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watching.task
            await asyncio.wait_for(proxy.client_closed.wait(), 5)


# --- tokens -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("transport", "asynchronous"), [("websocket", True), ("sse", False)])
async def test_short_lived_tokens_are_refreshed_without_interrupting_the_watch(
    module_server: ServerProcess, transport: Any, asynchronous: bool, make_token: Callable[..., str], worker_token: str
) -> None:
    """Tokens live 4 s (3 to 4 s: ``exp`` is whole seconds), the watch 9 s: the token function
    (async for one transport, sync for the other) is asked before each expiry, the server never
    ends the link for an expired token, and no state is missed."""
    job = new_id()
    asked: list[float] = []

    def mint() -> str:
        asked.append(time.monotonic())
        return make_token("alice", ttl=4)

    async def mint_async() -> str:
        await asyncio.sleep(0)
        return mint()

    token: Callable[[], str] | Callable[[], Awaitable[str]] = mint_async if asynchronous else mint
    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        async with PhasecastClient(module_server.url, token=token, transports=(transport,)) as client:
            watching = Watching(client, job)
            # Several token lifetimes: the job outlives the first token twice over.
            expected = await report_for(api, watching, 9, step=2)
            states = await watching.end()
    assert [s.seq for s in states][:-1] == expected
    assert states[-1].phase is Phase.COMPLETE
    assert len(asked) >= 3  # the first token, then one before each expiry
    assert client.stats.token_refreshes >= 2
    if transport == "websocket":
        # Refreshed on the open socket: one connection from start to end.
        assert client.stats.links["websocket"] == 1
        assert client.stats.reconnects == 0


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_token_function_that_fails_once_is_asked_again_before_the_token_expires(
    module_server: ServerProcess, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    """The token service hiccups at the first refresh: the client keeps the link, asks again
    shortly, and the watch goes on without a reconnect or a lost state."""
    job = new_id()
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("token service unavailable")
        return make_token("alice", ttl=4)

    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        async with PhasecastClient(module_server.url, token=flaky, transports=(transport,)) as client:
            watching = Watching(client, job)
            expected = await report_for(api, watching, 5, step=3)
            states = await watching.end()
    assert [s.seq for s in states][:-1] == expected
    assert states[-1].phase is Phase.COMPLETE
    assert calls >= 3
    assert client.stats.token_refreshes >= 1
    # On the WebSocket the fresh token went over the open link; SSE replaced its stream only
    # for refreshes, never because the token expired.
    assert client.stats.links[transport] == 1 + (client.stats.token_refreshes if transport == "sse" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_plain_token_that_expires_ends_the_watch_with_an_authentication_error(
    module_server: ServerProcess, transport: Any, make_token: Callable[..., str], worker_token: str
) -> None:
    """A string cannot be refreshed: when the server ends the link at its expiry (close 4401
    on the WebSocket, ``event: expired`` on SSE) the watch says so instead of retrying."""
    job = new_id()
    async with writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        async with PhasecastClient(module_server.url, token=make_token("alice", ttl=2), transports=(transport,)) as client:
            watching = Watching(client, job)
            await watching.seq(1)
            with pytest.raises(AuthenticationError, match="pass a function"):
                await asyncio.wait_for(watching.task, 10)
    assert watching.seqs() == [1]
    assert client.stats.links[transport] == 1


# --- transports and reachability ----------------------------------------------------------------


class Proxy:
    """A real TCP proxy in front of a server. ``refuse_upgrades``: it passes plain HTTP (SSE
    included) and answers every WebSocket upgrade with 403, as some corporate proxies do.
    ``swallow()``: from then on it passes nothing in either direction (a peer that stopped
    answering) but keeps reading, so it sees when a client closes its end."""

    def __init__(self, upstream_port: int, *, refuse_upgrades: bool = False) -> None:
        self.upstream_port = upstream_port
        self.refuse_upgrades = refuse_upgrades
        self.port = free_port()
        self.refused_upgrades = 0
        self.swallowed = asyncio.Event()  # bytes from a client were dropped after swallow()
        self.client_closed = asyncio.Event()  # a client's end of a connection closed
        self._passing = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def swallow(self) -> None:
        self._passing = False

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for open_writer in list(self._writers):
            open_writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        if self.refuse_upgrades and b"upgrade: websocket" in head.lower():
            self.refused_upgrades += 1
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.add(up_writer)
        up_writer.write(head)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await src.read(65536):
                    if self._passing:
                        dst.write(chunk)
                        await dst.drain()
                    elif from_client:
                        self.swallowed.set()
            if from_client:
                self.client_closed.set()
            if self._passing:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            up_writer.close()
            self._writers.discard(up_writer)


async def test_falls_back_to_sse_when_websockets_are_refused(
    module_server: ServerProcess, make_token: Callable[..., str], worker_token: str
) -> None:
    job = new_id()
    async with Proxy(module_server.port, refuse_upgrades=True) as proxy, writer(module_server.url, worker_token) as api:
        await api.post("/v1/jobs", json={"job_id": job, "owner": "alice"})
        async with PhasecastClient(proxy.url, token=make_token("alice"), retry=FAST) as client:
            watching = Watching(client, job)
            await watching.seq(1)
            mid = await progress(api, job, 50)
            await watching.seq(mid)
            await api.post(f"/v1/jobs/{job}/complete", json={})
            states = await watching.end()
            # The next watch goes straight to SSE: no more refused upgrades.
            assert (await client.wait(job)).phase is Phase.COMPLETE
    assert [s.seq for s in states][:2] == [1, mid]
    assert states[-1].phase is Phase.COMPLETE
    assert proxy.refused_upgrades == RetryPolicy().websocket_failures_before_fallback
    assert client.stats.fallbacks == 1
    assert client.stats.links["sse"] == 2


async def test_an_unreachable_server_fails_fast_or_after_the_give_up_time(make_token: Callable[..., str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with PhasecastClient(url, token=make_token("alice"), retry=RetryPolicy(fail_fast=True)) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionFailedError, match="cannot reach"):
            await client.wait("some-job")
        assert time.monotonic() - started < 5
    patient = RetryPolicy(base_delay=0.05, max_delay=0.2, give_up_after=1)
    async with PhasecastClient(url, token=make_token("alice"), retry=patient) as client:
        with pytest.raises(ConnectionFailedError, match="no working connection"):
            await asyncio.wait_for(client.wait("some-job"), 10)
        assert client.stats.links["websocket"] > 2
