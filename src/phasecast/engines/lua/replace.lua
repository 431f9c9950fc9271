-- Replace a job's state only if it is still the one the new state was computed from,
-- so two writers can never interleave; then extend its life, append history and announce.
-- KEYS: 1 state hash, 2 history stream (both tagged with the job id: one slot)
-- ARGV: 1 expected seq, 2 state json, 3 new seq, 4 ttl seconds, 5 history maxlen,
--       6 history entry json, 7 channel, 8 pub/sub payload, 9 terminal (0/1),
--       10 PUBLISH or SPUBLISH
-- Returns 1 (stored), 2 (stored; the job's index entries are still to be written),
-- 0 (stale base), -1 (no such job), -2 (refused: the job has finished).
local current = redis.call('HMGET', KEYS[1], 'seq', 'terminal', 'ix')
if not current[1] then
  return -1
end
if current[1] ~= ARGV[1] then
  return 0
end
-- The rules ran against this exact state; re-check the one that must hold whatever a
-- caller computed: a finished job never changes. (That seq moves up by one is checked by
-- the caller before it sends anything.)
if current[2] == '1' then
  return -2
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'seq', ARGV[3], 'terminal', ARGV[9])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[10], ARGV[7], ARGV[8])
if current[3] == '0' then
  return 2
end
return 1
