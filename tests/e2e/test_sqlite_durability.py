"""SQLite: a report is on disk before it is acknowledged. A server taking reports from many
writers at once (so they share transactions) is killed with SIGKILL mid-stream; every report
it had acknowledged is in the file afterwards, in the state and in the history."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import httpx
from tests.support.process import ServerProcess

from phasecast.model import JobState

JOBS = 8
WRITERS = 16  # two per job: reports of one job are decided in one transaction too
ACKS_BEFORE_KILL = 400


async def test_a_server_killed_mid_stream_keeps_every_report_it_acknowledged(
    tmp_path: Path, worker_token: str
) -> None:
    path = tmp_path / "phasecast.db"
    server = ServerProcess(f"sqlite:///{path}", log_path=tmp_path / "server.log").start()
    acked: list[tuple[str, int, float]] = []  # job, seq, phase_progress of each acknowledged report
    enough = asyncio.Event()
    try:
        headers = {"Authorization": f"Bearer {worker_token}"}
        limits = httpx.Limits(max_connections=WRITERS)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits) as api:
            jobs = [f"durable-{n}" for n in range(JOBS)]
            for job_id in jobs:
                assert (await api.post("/v1/jobs", json={"job_id": job_id, "owner": "alice"})).status_code == 201

            async def writer(k: int) -> None:
                job_id, n = jobs[k % JOBS], 0
                with contextlib.suppress(httpx.TransportError):
                    while True:
                        n += 1
                        body = {"phase": "GENERATING", "phase_progress": min(99.0, n * 0.01 + k * 0.001)}
                        reply = await api.post(f"/v1/jobs/{job_id}/progress", json=body)
                        assert reply.status_code == 200, reply.text
                        answer = reply.json()
                        if answer["applied"]:
                            acked.append((job_id, answer["state"]["seq"], answer["state"]["phase_progress"]))
                            if len(acked) >= ACKS_BEFORE_KILL:
                                enough.set()

            writers = [asyncio.create_task(writer(k)) for k in range(WRITERS)]
            await asyncio.wait_for(enough.wait(), 120)
            server.kill()  # SIGKILL with reports in flight
            await asyncio.gather(*writers)
    finally:
        server.kill()

    with sqlite3.connect(path) as db:  # opening it recovers from the WAL, as a restart would
        states = {job_id: JobState.from_json(state) for job_id, state in db.execute("SELECT job_id, state FROM jobs")}
        history = {
            (job_id, seq): entry for job_id, seq, entry in db.execute("SELECT job_id, seq, entry FROM job_events")
        }
    assert len(acked) >= ACKS_BEFORE_KILL
    for job_id, seq, progress in acked:
        assert states[job_id].seq >= seq, f"{job_id}: acknowledged seq {seq} lost"
        assert (job_id, seq) in history, f"{job_id}: acknowledged seq {seq} missing from the history"
        assert f'"phase_progress":{progress!r}' in history[job_id, seq]
    for job_id, state in states.items():
        # Nothing stored skips a seq: the history is every change up to the stored state.
        seqs = sorted(seq for job, seq in history if job == job_id)
        assert seqs == list(range(1, state.seq + 1))
