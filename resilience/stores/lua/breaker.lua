-- Circuit breaker state machine (the Redis twin of resilience.stores.breaker's memory store).
-- KEYS[1] state hash, KEYS[2] window hash.
-- ARGV: 1 now ('' = server TIME), 2 op, 3 failure_rate, 4 window, 5 minimum_calls,
--       6 open_duration, 7 half_open_calls, 8 slow_enabled (0/1), 9 slow_call_rate,
--       10 buckets per window, 11 half-open busy retry_after, 12.. op arguments
local op = ARGV[2]
local failure_rate = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local minimum_calls = tonumber(ARGV[5])
local open_duration = tonumber(ARGV[6])
local half_open_calls = tonumber(ARGV[7])
local slow_enabled = ARGV[8] == '1'
local slow_rate = tonumber(ARGV[9])
local nb = tonumber(ARGV[10])
local ttl = math.ceil(math.max(window * 3, open_duration * 3, 3600) * 1000)

local raw = redis.call('HMGET', KEYS[1], 'state', 'gen', 'until', 'probes', 'successes', 'since')
local state = raw[1] or 'closed'
local gen = tonumber(raw[2] or '0')
local until_ = tonumber(raw[3] or '0')
local probes = tonumber(raw[4] or '0')
local successes = tonumber(raw[5] or '0')
local since = tonumber(raw[6] or '0')
local dirty = false

local function set_open(duration)
  state = 'open'; gen = gen + 1; until_ = now + duration; dirty = true
  redis.call('DEL', KEYS[2])
end
local function half_open_if_due()
  if state == 'open' and now >= until_ then
    state = 'half_open'; gen = gen + 1; probes = 0; successes = 0; since = now; dirty = true
  end
end
local function snap()
  if dirty then
    redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'until', string.format('%.6f', until_),
      'probes', probes, 'successes', successes, 'since', string.format('%.6f', since))
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  local retry_after = 0
  if state == 'open' then
    retry_after = math.max(0, until_ - now)
  elseif state == 'half_open' and probes >= half_open_calls then
    retry_after = math.min(tonumber(ARGV[11]), math.max(0, since + open_duration - now))
  end
  return {state, gen, string.format('%.6f', retry_after)}
end

if op == 'sync' then
  half_open_if_due()
  local calls, failures, slow = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
  local earlier, age = tonumber(ARGV[15] or '0'), tonumber(ARGV[16] or '0')
  if state == 'closed' and (calls + failures + slow + earlier) > 0 then
    local idx = math.floor(now / (window / nb))
    redis.call('HINCRBY', KEYS[2], 'c:' .. idx, calls)
    if earlier > 0 then  -- a local batch of successes, placed where it happened
      local then_ = math.min(idx, math.floor((now - age) / (window / nb)))
      if then_ > idx - nb then redis.call('HINCRBY', KEYS[2], 'c:' .. then_, earlier) end
    end
    if failures > 0 then redis.call('HINCRBY', KEYS[2], 'f:' .. idx, failures) end
    if slow > 0 then redis.call('HINCRBY', KEYS[2], 's:' .. idx, slow) end
    redis.call('PEXPIRE', KEYS[2], math.ceil(window * 2000))
    local all = redis.call('HGETALL', KEYS[2])
    local c, f, s = 0, 0, 0
    local oldest = idx - nb + 1
    for i = 1, #all, 2 do
      local kind, bidx = string.match(all[i], '^(%a):(%-?%d+)$')
      bidx = tonumber(bidx)
      if bidx < oldest then
        redis.call('HDEL', KEYS[2], all[i])
      else
        local v = tonumber(all[i + 1])
        if kind == 'c' then c = c + v elseif kind == 'f' then f = f + v else s = s + v end
      end
    end
    if c >= minimum_calls and c > 0 then
      if f / c >= failure_rate or (slow_enabled and s / c >= slow_rate) then
        set_open(open_duration)
      end
    end
  end
  return snap()
elseif op == 'acquire' then
  half_open_if_due()
  if state == 'closed' then return {1, unpack(snap())} end
  if state == 'half_open' then
    if probes >= half_open_calls and now - since >= open_duration then
      probes = 0; successes = 0; since = now; dirty = true
    end
    if probes < half_open_calls then
      probes = probes + 1; dirty = true
      local s = snap()
      return {1, s[1], s[2], '0'}
    end
  end
  return {0, unpack(snap())}
elseif op == 'result' then
  local g, outcome = tonumber(ARGV[12]), ARGV[13]
  if state == 'half_open' and gen == g then
    if outcome == 'failure' then
      set_open(open_duration)
    elseif outcome == 'success' then
      successes = successes + 1; dirty = true
      if successes >= half_open_calls then
        state = 'closed'; gen = gen + 1
        redis.call('DEL', KEYS[2])
      end
    else
      probes = math.max(0, probes - 1); dirty = true
    end
  end
  return snap()
elseif op == 'force' then
  local target, duration = ARGV[12], tonumber(ARGV[13])
  if target == 'open' then
    set_open(duration)
  elseif target == 'closed' then
    state = 'closed'; gen = gen + 1; dirty = true
    redis.call('DEL', KEYS[2])
  else
    state = 'half_open'; gen = gen + 1; probes = 0; successes = 0; since = now; dirty = true
  end
  return snap()
else
  half_open_if_due()
  return snap()
end
