-- Generic cell rate algorithm. KEYS[1] tat key. ARGV: 1 now, 2 interval, 3 burst, 4 cost
local interval, burst, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * cost
local excess = new_tat - now - interval * burst
if excess > 1e-9 then
  return {0, string.format('%.6f', excess)}
end
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX',
  math.max(1, math.ceil((new_tat - now) * 1000) + 1000))
return {1, '0'}
