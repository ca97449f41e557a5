-- Prepended to every Tidegate script: `now` is ARGV[1] (a driven test clock) or, when
-- ARGV[1] is empty, the Redis server's TIME, so processes on different hosts agree on it.
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
