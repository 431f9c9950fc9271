"""The RunPod integration's panel records on Redis (``RedisEngine.panel_records()``).

A hash per job (``runpod_panels``, carrying the job's hash tag) holds one record per panel;
one sorted set indexes the active panels of every job by next poll time, and a key per
panel holds the lease of the instance polling it. Each script touches one key, so this works
on Redis Cluster: the job's hash and the cross-job index are written by separate commands
(see ``PanelRecords`` for the order that keeps a crash harmless).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from phasecast.engines.redis_keys import RedisKeys
from phasecast.errors import EngineUnavailable

if TYPE_CHECKING:
    from phasecast.engines.redis import RedisEngine

RECORD_TTL_SECONDS = 7 * 24 * 3600

_SWAP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def member(job_id: str, step: str) -> str:
    # "/" never occurs in job ids or step ids, so this splits back unambiguously.
    return f"{job_id}/{step}"


class RedisPanelRecords:
    def __init__(self, engine: RedisEngine) -> None:
        self._engine = engine
        self.keys: RedisKeys = engine.keys
        self._scripts: dict[str, Any] = {}

    async def start(self) -> None:
        client = self._engine.client
        self._scripts = {
            "swap": client.register_script(_SWAP),
            "lease": client.register_script(_LEASE),
            "release": client.register_script(_RELEASE),
        }

    async def _guard(self, work: Awaitable[Any]) -> Any:
        """Await one Redis call; anything redis-py raises for a store it cannot use right now
        (cluster errors during a failover included) becomes ``EngineUnavailable``."""
        from phasecast.engines.redis import REDIS_ERRORS

        try:
            return await work
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"cannot use the RunPod panel records in Redis: {exc}") from exc

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._guard(self._scripts[name](keys=keys, args=args))

    async def get(self, job_id: str, step: str) -> str | None:
        raw = await self._guard(self._engine.client.hget(self.keys.runpod_panels(job_id), step))
        return None if raw is None else str(raw)

    async def all(self, job_id: str) -> list[str]:
        rows = await self._guard(self._engine.client.hgetall(self.keys.runpod_panels(job_id)))
        return [str(raw) for raw in rows.values()]

    async def swap(
        self, job_id: str, step: str, old: str | None, new: str, *, active: bool, next_poll: float
    ) -> bool:
        client = self._engine.client
        if active:
            await self._guard(client.zadd(self.keys.runpod_inflight(), {member(job_id, step): next_poll}))
        stored = await self._call("swap", [self.keys.runpod_panels(job_id)],
                                  [step, "" if old is None else old, new, RECORD_TTL_SECONDS])
        if stored == 1 and not active:
            await self._guard(client.zrem(self.keys.runpod_inflight(), member(job_id, step)))
        return bool(stored == 1)

    async def schedule(self, job_id: str, step: str, at: float) -> None:
        # XX: only a panel still indexed; a finished one was removed and stays removed.
        await self._guard(
            self._engine.client.zadd(self.keys.runpod_inflight(), {member(job_id, step): at}, xx=True)
        )

    async def unindex(self, job_id: str, step: str) -> None:
        await self._guard(self._engine.client.zrem(self.keys.runpod_inflight(), member(job_id, step)))

    async def due(self, now: float, limit: int) -> list[tuple[str, str]]:
        members = await self._guard(self._engine.client.zrangebyscore(
            self.keys.runpod_inflight(), "-inf", now, start=0, num=limit
        ))
        found: list[tuple[str, str]] = []
        for raw in members:
            job_id, _, step = str(raw).partition("/")
            found.append((job_id, step))
        return found

    async def lease(self, key: str, owner: str, ttl: float) -> bool:
        return bool(await self._call("lease", [self.keys.runpod_lease(key)], [owner, int(ttl * 1000)]) == 1)

    async def release(self, key: str, owner: str) -> None:
        await self._call("release", [self.keys.runpod_lease(key)], [owner])
