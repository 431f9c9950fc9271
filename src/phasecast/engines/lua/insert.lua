-- Create a job unless its id is taken; record the first history entry; announce it.
-- Every key (and the channel) carries the job id as hash tag: one slot on a cluster.
-- The cross-job indexes are written by the engine afterwards; ``ix`` stays 0 until then.
-- KEYS: 1 state hash, 2 history stream
-- ARGV: 1 state json, 2 seq, 3 ttl seconds, 4 history maxlen, 5 history entry json,
--       6 channel, 7 pub/sub payload, 8 terminal (0/1), 9 PUBLISH or SPUBLISH
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'seq', ARGV[2], 'terminal', ARGV[8], 'ix', '0')
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[9], ARGV[6], ARGV[7])
return 1
