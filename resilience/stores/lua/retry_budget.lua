-- Retry budget window. KEYS[1] window hash.
-- ARGV: 1 now, 2 op (add|spend), 3 requests, 4 ratio, 5 floor, 6 window, 7 buckets per window
local op, requests = ARGV[2], tonumber(ARGV[3])
local ratio, floor, window, nb = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7])
local idx = math.floor(now / (window / nb))
if requests > 0 then redis.call('HINCRBY', KEYS[1], 'r:' .. idx, requests) end
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 2000))
if op == 'add' then return 1 end
local all = redis.call('HGETALL', KEYS[1])
local r, t = 0, 0
local oldest = idx - nb + 1
for i = 1, #all, 2 do
  local kind, bidx = string.match(all[i], '^(%a):(%-?%d+)$')
  bidx = tonumber(bidx)
  if bidx < oldest then
    redis.call('HDEL', KEYS[1], all[i])
  else
    local v = tonumber(all[i + 1])
    if kind == 'r' then r = r + v else t = t + v end
  end
end
if t + 1 <= ratio * r + floor then
  redis.call('HINCRBY', KEYS[1], 't:' .. idx, 1)
  return 1
end
return 0
