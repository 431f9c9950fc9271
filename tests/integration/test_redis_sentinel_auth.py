"""Sentinels that ask for a password (``requirepass`` on every sentinel, as managed and
hardened deployments run them): ``?sentinel_password=`` in a ``redis+sentinel://`` URL is
what the engine sends them; without it, or with a wrong one, the engine does not start and
says which parameter to set. Real processes of our own: a primary, a replica, one sentinel."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from tests.support.redis_servers import RedisSentinelProcesses

from phasecast.engines import open_engine
from phasecast.errors import ConfigurationError, EngineUnavailable
from phasecast.model import Phase
from phasecast.tracker import ProgressTracker

PASSWORD = "s3ntinel-" + uuid.uuid4().hex[:8]

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def guarded() -> Iterator[RedisSentinelProcesses]:
    deployment = RedisSentinelProcesses(sentinels=1, quorum=1, sentinel_password=PASSWORD)
    deployment.start()
    try:
        yield deployment
    finally:
        deployment.stop()


async def test_the_sentinels_password_in_the_url_is_what_the_engine_sends_them(
    guarded: RedisSentinelProcesses,
) -> None:
    url = f"{guarded.url}&prefix=auth-{uuid.uuid4().hex[:8]}"
    async with ProgressTracker(open_engine(url)) as tracker:
        job = await tracker.create(owner="alice")
        async with tracker.watch(job.job_id) as watch:
            await tracker.report(job.job_id, Phase.ANALYZING, 40, "Reading the story")
            seen = await asyncio.wait_for(anext(aiter(watch)), 10)
            while seen.phase is not Phase.ANALYZING:
                seen = await asyncio.wait_for(anext(aiter(watch)), 10)
        assert (await tracker.get(job.job_id)).phase_progress == 40


@pytest.mark.parametrize("secret", [None, "wrong"])
async def test_without_the_sentinels_password_the_engine_says_which_parameter_to_set(
    guarded: RedisSentinelProcesses, secret: str | None
) -> None:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in guarded.sentinels)
    url = f"redis+sentinel://{hosts}/{guarded.SERVICE}/0?prefix=auth"
    if secret is not None:
        url += f"&sentinel_password={secret}"
    engine = open_engine(url)
    with pytest.raises(EngineUnavailable) as refused:
        await engine.start(lambda change: None)
    await engine.stop()
    assert "sentinel_password" in str(refused.value), refused.value
    assert "wrong" not in str(refused.value)  # the password given is never shown


def test_sentinel_credentials_belong_to_sentinel_urls_only() -> None:
    with pytest.raises(ConfigurationError, match="redis\\+sentinel://"):
        open_engine("redis://127.0.0.1:6379/0?sentinel_password=x")
    with pytest.raises(ConfigurationError, match="sentinel_password"):
        open_engine("redis+sentinel://127.0.0.1:26379/svc?sentinel_username=u")
