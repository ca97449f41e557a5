-- wrk script for bench/api_overload.py: an open-loop schedule, one connection per wrk thread.
--
-- Why one connection per thread: wrk runs one Lua state per thread, and with a single
-- connection the state knows which request each response answers, so it can time each one
-- and file it under its status code and priority (wrk's own histogram mixes them all).
--
-- Arguments (after --): out_dir path rate_per_s threads mode
--   mode "mix": the overload's mix (10% CRITICAL, 30% each HIGH/MEDIUM/LOW; every 5th request
--   from the greedy token); "critical": CRITICAL only, closed loop (rate 0), for the capacity.
-- Each thread writes one line per answer to out_dir/wrk-<id>.txt:
--   <status> <reason> <priority> <latency ms> <ms sent behind its schedule>
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } tg_timespec;
int clock_gettime(int clk, tg_timespec *ts);
]]
local ts = ffi.new("tg_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local MIX = { "critical", "high", "high", "high", "medium", "medium", "medium", "low", "low", "low" }
local TOKENS = 40

local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

local out, path, interval, threads, mode, start, k, sent, current, late_ms
function init(args)
  path = args[2]
  local rate = tonumber(args[3])
  threads = tonumber(args[4])
  mode = args[5]
  interval = rate > 0 and threads / rate or 0
  out = io.open(args[1] .. "/wrk-" .. id .. ".txt", "w")
  out:setvbuf("line") -- wrk never closes a thread's Lua state: nothing may stay buffered
  -- threads start a little apart: spread their first requests over one interval
  start = now() + 0.05 + interval * id / threads
  k = 0
end

function delay()
  if interval == 0 then return 0 end
  local due = start + k * interval
  local wait = due - now()
  return wait > 0 and math.floor(wait * 1000) or 0
end

function request()
  local n = k * threads + id
  local priority, token
  if mode == "critical" then
    priority, token = "critical", "bench-token-" .. (n % TOKENS)
  else
    priority = MIX[(n % #MIX) + 1]
    token = (n % 5 == 1) and "bench-greedy" or ("bench-token-" .. (math.floor(n / 5) % TOKENS))
  end
  local t = now()
  late_ms = interval > 0 and math.max(0, (t - (start + k * interval)) * 1000) or 0
  k = k + 1
  sent = t
  current = priority
  local body = '{"task":"search.index","args":["doc-' .. n .. '"],"priority":"' .. priority .. '"}'
  return wrk.format("POST", path, { ["Authorization"] = "Bearer " .. token,
                                    ["Content-Type"] = "application/json" }, body)
end

function response(status, headers, body)
  local took = (now() - sent) * 1000
  local reason = "accepted"
  if status ~= 202 then
    reason = string.match(body or "", '"error":"([^"]*)"') or "?"
    -- a job admitted to the publish lane and refused when its wait ran out, not at once
    if string.find(body or "", "no publish thread", 1, true) then reason = reason .. "_waited" end
  end
  out:write(string.format("%d %s %s %.3f %.3f\n", status, reason, current, took, late_ms))
end

function done(summary, latency, requests)
  io.write(string.format("wrk: %d requests, %d connect/read/write/timeout errors, %d non-2xx\n",
                         summary.requests, summary.errors.connect + summary.errors.read
                         + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
