-- Create a job unless its id is taken; record the first history entry; announce it.
-- KEYS: 1 state hash, 2 history stream, 3 owner index (zset), 4 all-jobs index (zset)
-- ARGV: 1 state json, 2 seq, 3 ttl seconds, 4 history maxlen, 5 history entry json,
--       6 channel, 7 pub/sub payload, 8 job id, 9 created-at score, 10 terminal (0/1)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'seq', ARGV[2], 'terminal', ARGV[10])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[8])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[9], ARGV[8])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
