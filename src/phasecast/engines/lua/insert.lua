-- Create a job unless its id is taken; record the first history entry; announce it.
-- Every key (and the channel) carries the job id as hash tag: one slot on a cluster.
-- The cross-job indexes are written by the engine afterwards; ``ix`` stays 0 until then.
-- ``cf`` keeps the create's fingerprint (a random token per create call): when a client
-- library sends the same create again because the reply was lost (a dropped connection),
-- the second run finds its own fingerprint and answers 2 (created, by this same call)
-- instead of 0 (the id is taken by someone else).
-- KEYS: 1 state hash, 2 history stream
-- ARGV: 1 state json, 2 seq, 3 ttl seconds, 4 history maxlen, 5 history entry json,
--       6 channel, 7 pub/sub payload, 8 terminal (0/1), 9 PUBLISH or SPUBLISH,
--       10 create fingerprint
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[10] ~= '' and redis.call('HGET', KEYS[1], 'cf') == ARGV[10] then
    return 2
  end
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'seq', ARGV[2], 'terminal', ARGV[8], 'ix', '0',
           'cf', ARGV[10])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[9], ARGV[6], ARGV[7])
return 1
