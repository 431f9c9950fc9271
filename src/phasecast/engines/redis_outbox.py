"""The archive outbox on Redis (``RedisEngine.archive_outbox()``): two hashes, one of the
newest unwritten state per job and one of unwritten events. Both are cross-job keys, each
script touches one of them, so this works on Redis Cluster. Several instances may replay the
same entries; the archive's writes are idempotent, so that only costs a repeat."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phasecast.errors import EngineUnavailable

if TYPE_CHECKING:
    from phasecast.engines.redis import RedisEngine

# Keep the higher seq: entries are "<seq>|<state JSON>".
_PUT_STATES = """
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local seq = tonumber(ARGV[i + 1])
  if not current or tonumber(string.match(current, '^(%d+)|')) < seq then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '|' .. ARGV[i + 2])
  end
end
return 1
"""

_ACK_STATES = """
for i = 1, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current and string.match(current, '^(%d+)|') == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 1
"""

SCAN_COUNT = 500


class RedisArchiveOutbox:
    def __init__(self, engine: RedisEngine) -> None:
        self._engine = engine
        self._keys = engine.keys
        self._scripts: dict[str, Any] = {}

    async def start(self) -> None:
        client = self._engine.client
        self._scripts = {"put": client.register_script(_PUT_STATES),
                         "ack": client.register_script(_ACK_STATES)}

    async def _guard(self, work: Any) -> Any:
        from phasecast.engines.redis import REDIS_ERRORS

        try:
            return await work
        except REDIS_ERRORS as exc:
            raise EngineUnavailable(f"the archive outbox in Redis is unreachable: {exc}") from exc

    async def put(self, states: list[tuple[str, int, str]], events: list[tuple[str, str]]) -> None:
        if states:
            args: list[Any] = []
            for job_id, seq, state_json in states:
                args += [job_id, seq, state_json]
            await self._guard(self._scripts["put"](keys=[self._keys.archive_states()], args=args))
        for key, event_json in events:
            await self._guard(self._engine.client.hsetnx(self._keys.archive_events(), key, event_json))

    async def _scan(self, key: str, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` fields of the hash ``key``, as (field, value)."""
        found: list[tuple[str, str]] = []
        async for field, raw in self._engine.client.hscan_iter(key, count=SCAN_COUNT):
            found.append((str(field), str(raw)))
            if len(found) >= limit:
                break
        return found

    async def states(self, limit: int) -> list[tuple[str, int, str]]:
        rows: list[tuple[str, str]] = await self._guard(self._scan(self._keys.archive_states(), limit))
        found: list[tuple[str, int, str]] = []
        for job_id, raw in rows:
            seq, _, state_json = raw.partition("|")
            found.append((job_id, int(seq), state_json))
        return found

    async def events(self, limit: int) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = await self._guard(self._scan(self._keys.archive_events(), limit))
        return found

    async def state(self, job_id: str) -> str | None:
        raw = await self._guard(self._engine.client.hget(self._keys.archive_states(), job_id))
        return None if raw is None else str(raw).partition("|")[2]

    async def ack(self, states: list[tuple[str, int]], events: list[str]) -> None:
        if states:
            args: list[Any] = []
            for job_id, seq in states:
                args += [job_id, str(seq)]
            await self._guard(self._scripts["ack"](keys=[self._keys.archive_states()], args=args))
        if events:
            await self._guard(self._engine.client.hdel(self._keys.archive_events(), *events))

    async def size(self) -> int:
        client = self._engine.client
        states = await self._guard(client.hlen(self._keys.archive_states()))
        events = await self._guard(client.hlen(self._keys.archive_events()))
        return int(states) + int(events)
