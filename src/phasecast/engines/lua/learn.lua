-- Fold one finished job's phase durations into the kind's exponentially weighted means.
-- KEYS: 1 stats hash of the kind
-- ARGV: 1 learning rate, then pairs of phase name and seconds
local rate = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local phase, seconds = ARGV[i], tonumber(ARGV[i + 1])
  local mean = tonumber(redis.call('HGET', KEYS[1], phase .. ':mean'))
  local samples = tonumber(redis.call('HGET', KEYS[1], phase .. ':n')) or 0
  if mean then
    mean = mean + rate * (seconds - mean)
  else
    mean = seconds
  end
  redis.call('HSET', KEYS[1], phase .. ':mean', tostring(mean), phase .. ':n', samples + 1)
end
return 1
