"""A create whose reply is lost is sent again by redis-py, and the engine answers it as the
first run did (created), not 409: the insert script recognises its own create by a
fingerprint. Runs for real: a proxy in front of a private Redis (a plain one, and a cluster
of one node that announces the proxy's port) forwards the create, swallows its reply and
cuts the connection; redis-py reconnects and sends the same create again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.support.redis_servers import RedisNode, ReplyDroppingProxy, serve_all_slots

from phasecast.engines import open_engine
from phasecast.errors import JobExists
from phasecast.model import new_job, utc_now

pytestmark = pytest.mark.redis


@pytest.fixture(params=["redis", "cluster"])
def node(request: pytest.FixtureRequest) -> Iterator[RedisNode]:
    with RedisNode(aof=False, cluster=request.param == "cluster") as found:
        yield found


async def test_a_create_retried_after_its_reply_was_lost_is_created_once(node: RedisNode) -> None:
    job_id = "lost-reply-7"
    async with ReplyDroppingProxy(node.port, marker=job_id.encode()) as proxy:
        if node.cluster:
            serve_all_slots(node, announce_port=proxy.port)
        engine = open_engine(f"{proxy.url}?prefix=retry")
        await engine.start()
        try:
            # Another job first: the script is then loaded, so the dropped reply is the one of
            # a create that ran (not a NOSCRIPT refusal).
            await engine.insert(new_job(job_id="warm-up", owner="bob", kind="comic", metadata={},
                                        now=utc_now()))
            state = new_job(job_id=job_id, owner="alice", kind="comic", metadata={}, now=utc_now())
            await engine.insert(state)  # the first run's reply is lost; redis-py sends it again
            assert len(proxy.dropped) == 1, "the proxy never dropped the create's reply"
            assert b"NOSCRIPT" not in proxy.dropped[0]
            assert await engine.load(job_id) == state
            assert [e["seq"] for e in await engine.history(job_id, limit=10)] == [1]
            listed = await engine.list_jobs("alice", active_only=False, limit=10)
            assert [s.job_id for s in listed] == [job_id]
            # Another create of the same id is still refused: only the same call is recognised.
            again = new_job(job_id=job_id, owner="alice", kind="comic", metadata={}, now=utc_now())
            with pytest.raises(JobExists):
                await engine.insert(again)
            with pytest.raises(JobExists):
                await engine.insert(state)
        finally:
            await engine.stop()
