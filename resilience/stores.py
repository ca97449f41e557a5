"""Where breakers, rate limiters and retry budgets keep their state.

One interface (:class:`StateStore`), two implementations: :class:`MemoryStore` (one process)
and :class:`RedisStore` (every worker and producer sees one state). The Redis side runs each
operation as one Lua script, so read-decide-write is atomic and costs one round trip, and it
takes time from the Redis server (``TIME``) so processes on different hosts agree on it.

Operations speak in *deltas* and *snapshots*: callers count locally and merge counts in
batches (see :mod:`resilience.breaker`), so the success path does not pay a round trip.

If Redis is unreachable, :class:`RedisStore` answers from a local :class:`MemoryStore`,
sets ``tidegate_state_store_degraded{store=...}`` to 1 and tries Redis again after
``retry_interval``: a call is never failed because the state store is down.

Caches for the cached-value fallback live here too (:class:`MemoryCache`, :class:`RedisCache`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from . import metrics
from .clock import SYSTEM_CLOCK, Clock
from .errors import ConfigError

__all__ = [
    "BUCKETS_PER_WINDOW",
    "BreakerParams",
    "BreakerSnapshot",
    "Cache",
    "CacheEntry",
    "MemoryCache",
    "MemoryStore",
    "RedisCache",
    "RedisStore",
    "StateStore",
    "redis_client",
]

log = logging.getLogger(__name__)

BUCKETS_PER_WINDOW = 10
"""A rolling window is this many buckets (10 s window -> 1 s buckets)."""

HALF_OPEN_BUSY_RETRY_AFTER = 1.0
"""retry_after given while every half-open trial slot is taken."""


class BreakerParams(Protocol):
    """What a store needs of a breaker config (``resilience.breaker.BreakerConfig``)."""

    failure_rate: float
    window: float
    minimum_calls: int
    open_duration: float
    half_open_calls: int
    slow_call_duration: float | None
    slow_call_rate: float


class BreakerSnapshot(NamedTuple):
    """The shared view of one breaker: state name, generation, seconds until it may probe."""

    state: str  # "closed" | "open" | "half_open"
    generation: int
    retry_after: float


@runtime_checkable
class StateStore(Protocol):
    """Atomic operations on shared resilience state. Times come from the store's own clock."""

    name: str

    def breaker_sync(
        self, name: str, cfg: BreakerParams, calls: int, failures: int, slow: int,
        earlier: int = 0, age: float = 0.0,
    ) -> BreakerSnapshot:
        """Merge counts into the rolling window (CLOSED only), trip if over threshold.

        ``earlier`` successes happened ``age`` seconds ago (a local batch): they go to the
        bucket of that time, or nowhere if it has left the window.
        """

    def breaker_acquire(self, name: str, cfg: BreakerParams) -> tuple[bool, BreakerSnapshot]:
        """Ask for a trial slot (OPEN past its duration becomes HALF_OPEN)."""

    def breaker_result(
        self, name: str, cfg: BreakerParams, generation: int, outcome: str
    ) -> BreakerSnapshot:
        """Report a trial call: "success", "failure" or "ignored" (frees the slot)."""

    def breaker_force(
        self, name: str, cfg: BreakerParams, state: str, duration: float
    ) -> BreakerSnapshot:
        """Operator override: put the breaker in ``state`` (OPEN for ``duration`` s)."""

    def breaker_read(self, name: str, cfg: BreakerParams) -> BreakerSnapshot: ...

    def gcra(self, key: str, rate: float, burst: int, cost: int = 1) -> tuple[bool, float]:
        """Generic cell rate algorithm: (allowed, retry_after seconds)."""

    def budget_add(self, name: str, requests: int, window: float) -> None:
        """Deposit requests into the retry budget's window."""

    def budget_spend(
        self, name: str, requests: int, ratio: float, floor: float, window: float
    ) -> bool:
        """Deposit requests, then take one retry if retries + 1 <= ratio*requests + floor."""


# --------------------------------------------------------------------------- memory


class _Breaker:
    __slots__ = (
        "buckets",
        "gen",
        "idx",
        "probe_since",
        "probes",
        "state",
        "successes",
        "totals",
        "until",
    )

    def __init__(self) -> None:
        self.state = "closed"
        self.gen = 0
        self.until = 0.0
        self.probes = 0
        self.successes = 0
        self.probe_since = 0.0
        self.buckets: dict[int, list[int]] = {}
        self.idx: int | None = None  # newest bucket seen; the window is pruned when it moves
        self.totals = [0, 0, 0]  # calls, failures, slow over ``buckets``, kept incrementally

    def clear_window(self) -> None:
        self.buckets.clear()
        self.idx = None
        self.totals = [0, 0, 0]


def _over_threshold(cfg: BreakerParams, calls: int, failures: int, slow: int) -> bool:
    if calls < cfg.minimum_calls or calls == 0:
        return False
    if failures / calls >= cfg.failure_rate:
        return True
    return cfg.slow_call_duration is not None and slow / calls >= cfg.slow_call_rate


class MemoryStore:
    """Process-local state behind one lock; the reference semantics of every operation."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, name: str = "memory") -> None:
        self.clock = clock
        self.name = name
        self._lock = threading.Lock()
        self._breakers: dict[str, _Breaker] = {}
        self._tat: dict[str, float] = {}
        self._budgets: dict[str, dict[int, list[int]]] = {}
        self._budget_idx: dict[str, int] = {}

    # -- breaker
    def _b(self, name: str) -> _Breaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = _Breaker()
        return b

    def _snap(self, b: _Breaker, cfg: BreakerParams, now: float) -> BreakerSnapshot:
        if b.state == "open":
            return BreakerSnapshot("open", b.gen, max(0.0, b.until - now))
        if b.state == "half_open" and b.probes >= cfg.half_open_calls:
            # busy: come back in a second, or when the trials' lease runs out if sooner
            lease_left = max(0.0, b.probe_since + cfg.open_duration - now)
            return BreakerSnapshot("half_open", b.gen, min(HALF_OPEN_BUSY_RETRY_AFTER, lease_left))
        return BreakerSnapshot(b.state, b.gen, 0.0)

    @staticmethod
    def _open(b: _Breaker, now: float, duration: float) -> None:
        b.state, b.gen, b.until = "open", b.gen + 1, now + duration
        b.clear_window()

    @staticmethod
    def _half_open_if_due(b: _Breaker, now: float) -> None:
        if b.state == "open" and now >= b.until:
            b.state, b.gen, b.probes, b.successes, b.probe_since = "half_open", b.gen + 1, 0, 0, now

    def breaker_sync(self, name, cfg, calls, failures, slow, earlier=0, age=0.0):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            self._half_open_if_due(b, now)
            if b.state == "closed" and (calls or failures or slow or earlier):
                width = cfg.window / BUCKETS_PER_WINDOW
                idx = math.floor(now / width)
                oldest = idx - BUCKETS_PER_WINDOW + 1
                buckets, totals = b.buckets, b.totals
                if idx != b.idx:  # a new bucket: drop the ones that left the window
                    for k in [k for k in buckets if k < oldest]:
                        gone = buckets.pop(k)
                        totals[0] -= gone[0]
                        totals[1] -= gone[1]
                        totals[2] -= gone[2]
                    b.idx = idx
                adds = [(idx, calls, failures, slow)]
                if earlier:
                    then = math.floor((now - age) / width)
                    if then >= oldest:
                        adds.append((min(then, idx), earlier, 0, 0))
                for k, c, f, sl in adds:
                    bucket = buckets.get(k)
                    if bucket is None:
                        bucket = buckets[k] = [0, 0, 0]
                    bucket[0] += c
                    bucket[1] += f
                    bucket[2] += sl
                    totals[0] += c
                    totals[1] += f
                    totals[2] += sl
                if _over_threshold(cfg, totals[0], totals[1], totals[2]):
                    self._open(b, now, cfg.open_duration)
            return self._snap(b, cfg, now)

    def breaker_acquire(self, name, cfg):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            self._half_open_if_due(b, now)
            if b.state == "closed":
                return True, self._snap(b, cfg, now)
            if b.state == "half_open":
                if b.probes >= cfg.half_open_calls and now - b.probe_since >= cfg.open_duration:
                    # trial calls that never reported (their process died): lease expired
                    b.probes, b.successes, b.probe_since = 0, 0, now
                if b.probes < cfg.half_open_calls:
                    b.probes += 1
                    return True, BreakerSnapshot("half_open", b.gen, 0.0)
            return False, self._snap(b, cfg, now)

    def breaker_result(self, name, cfg, generation, outcome):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            if b.state == "half_open" and b.gen == generation:
                if outcome == "failure":
                    self._open(b, now, cfg.open_duration)
                elif outcome == "success":
                    b.successes += 1
                    if b.successes >= cfg.half_open_calls:
                        b.state, b.gen = "closed", b.gen + 1
                        b.clear_window()
                else:
                    b.probes = max(0, b.probes - 1)
            return self._snap(b, cfg, now)

    def breaker_force(self, name, cfg, state, duration):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            if state == "open":
                self._open(b, now, duration)
            elif state == "closed":
                b.state, b.gen = "closed", b.gen + 1
                b.clear_window()
            elif state == "half_open":
                b.state, b.gen, b.probes, b.successes, b.probe_since = (
                    "half_open",
                    b.gen + 1,
                    0,
                    0,
                    now,
                )
            else:
                raise ConfigError(f"unknown breaker state {state!r}")
            return self._snap(b, cfg, now)

    def breaker_read(self, name, cfg):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            self._half_open_if_due(b, now)
            return self._snap(b, cfg, now)

    # -- rate limit
    def gcra(self, key, rate, burst, cost=1):
        interval = 1.0 / rate
        with self._lock:
            now = self.clock.now()
            tat = max(self._tat.get(key, now), now)
            new_tat = tat + interval * cost
            excess = new_tat - now - interval * burst
            if excess > 1e-9:
                return False, excess
            self._tat[key] = new_tat
            return True, 0.0

    # -- retry budget
    def _budget_window(self, name: str, window: float, now: float) -> tuple[dict, int]:
        buckets = self._budgets.get(name)
        if buckets is None:
            buckets = self._budgets[name] = {}
        idx = math.floor(now / (window / BUCKETS_PER_WINDOW))
        if self._budget_idx.get(name) != idx:  # pruned only when a new bucket starts
            oldest = idx - BUCKETS_PER_WINDOW + 1
            for k in [k for k in buckets if k < oldest]:
                del buckets[k]
            self._budget_idx[name] = idx
        return buckets, idx

    def budget_add(self, name, requests, window):
        with self._lock:
            buckets, idx = self._budget_window(name, window, self.clock.now())
            bucket = buckets.get(idx)
            if bucket is None:
                bucket = buckets[idx] = [0, 0]
            bucket[0] += requests

    def budget_spend(self, name, requests, ratio, floor, window):
        with self._lock:
            buckets, idx = self._budget_window(name, window, self.clock.now())
            bucket = buckets.setdefault(idx, [0, 0])
            bucket[0] += requests
            total_requests = sum(v[0] for v in buckets.values())
            total_retries = sum(v[1] for v in buckets.values())
            if total_retries + 1 <= ratio * total_requests + floor:
                bucket[1] += 1
                return True
            return False


# --------------------------------------------------------------------------- redis

_LUA_NOW = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS[1] state hash, KEYS[2] window hash.
# ARGV: 1 now ('' = server TIME), 2 op, 3 failure_rate, 4 window, 5 minimum_calls,
#       6 open_duration, 7 half_open_calls, 8 slow_enabled (0/1), 9 slow_call_rate,
#       10.. op arguments
_BREAKER_LUA = (
    _LUA_NOW
    + """
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
"""
)

# KEYS[1] tat key. ARGV: 1 now, 2 interval, 3 burst, 4 cost
_GCRA_LUA = (
    _LUA_NOW
    + """
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
"""
)

# KEYS[1] budget window hash. ARGV: 1 now, 2 op, 3 requests, 4 ratio, 5 floor, 6 window, 7 nb
_BUDGET_LUA = (
    _LUA_NOW
    + """
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
"""
)


def redis_client(
    url: str = "redis://127.0.0.1:6379/0",
    *,
    socket_timeout: float = 0.1,
    socket_connect_timeout: float = 0.1,
    **kwargs: Any,
):
    """A redis-py client that cannot hang: every socket operation has a timeout."""
    import redis

    if not socket_timeout or not socket_connect_timeout:
        raise ConfigError("Redis state store needs finite socket timeouts (never infinite)")
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        **kwargs,
    )


def _check_timeouts(client: Any) -> None:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if kwargs is None:  # a cluster client or a fake: trust the caller
        return
    if kwargs.get("socket_timeout") is None:
        raise ConfigError(
            "Redis client has no socket_timeout: build it with resilience.stores.redis_client() "
            "or pass socket_timeout/socket_connect_timeout"
        )


class RedisStore:
    """Shared state in Redis. Keys look like ``{tidegate:breaker:payments}:state``.

    The hash tag keeps one breaker's (or limiter key's) keys in one Redis Cluster slot so
    each Lua script touches a single slot. The client must have socket timeouts
    (:func:`redis_client` builds one); a client without is refused.

    ``clock``: ``None`` uses the Redis server's clock (right for many hosts); pass a clock
    only in tests that drive time by hand.
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "tidegate",
        *,
        clock: Clock | None = None,
        fallback: MemoryStore | None = None,
        retry_interval: float = 1.0,
        name: str = "redis",
    ) -> None:
        import redis

        _check_timeouts(client)
        self.client = client
        self.prefix = prefix
        self.name = name
        self.clock = clock
        self.fallback = fallback if fallback is not None else MemoryStore(clock or SYSTEM_CLOCK)
        self.retry_interval = retry_interval
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._down_until = 0.0
        self._degraded = False
        self._breaker = client.register_script(_BREAKER_LUA)
        self._gcra = client.register_script(_GCRA_LUA)
        self._budget = client.register_script(_BUDGET_LUA)
        metrics.STORE_DEGRADED.labels(store=name).set(0)

    # -- plumbing
    def key(self, kind: str, name: str, suffix: str = "") -> str:
        base = "{" + f"{self.prefix}:{kind}:{name}" + "}"
        return f"{base}:{suffix}" if suffix else base

    def _now_arg(self) -> str:
        return "" if self.clock is None else repr(self.clock.now())

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and the local fallback answers."""
        return self._degraded

    def _run(self, operation: str, remote: Callable[[], Any], local: Callable[[], Any]) -> Any:
        if self._degraded and time.monotonic() < self._down_until:
            return local()
        try:
            result = remote()
        except self._errors as exc:
            metrics.STORE_ERRORS.labels(store=self.name, operation=operation).inc()
            if not self._degraded:
                log.warning("state store %s unreachable (%s); using local state", self.name, exc)
            self._degraded = True
            self._down_until = time.monotonic() + self.retry_interval
            metrics.STORE_DEGRADED.labels(store=self.name).set(1)
            return local()
        if self._degraded:
            log.warning("state store %s reachable again", self.name)
            self._degraded = False
            metrics.STORE_DEGRADED.labels(store=self.name).set(0)
        return result

    def _breaker_call(self, name: str, cfg: BreakerParams, op: str, *extra: Any) -> list:
        keys = [self.key("breaker", name, "state"), self.key("breaker", name, "window")]
        args = [
            self._now_arg(), op, cfg.failure_rate, cfg.window, cfg.minimum_calls,
            cfg.open_duration, cfg.half_open_calls,
            1 if cfg.slow_call_duration is not None else 0, cfg.slow_call_rate,
            BUCKETS_PER_WINDOW, HALF_OPEN_BUSY_RETRY_AFTER, *extra,
        ]  # fmt: skip
        return self._breaker(keys=keys, args=args)

    @staticmethod
    def _snap(raw: list) -> BreakerSnapshot:
        state = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        return BreakerSnapshot(state, int(raw[1]), float(raw[2]))

    # -- breaker
    def breaker_sync(self, name, cfg, calls, failures, slow, earlier=0, age=0.0):
        return self._run(
            "breaker_sync",
            lambda: self._snap(self._breaker_call(
                name, cfg, "sync", calls, failures, slow, earlier, repr(float(age)))),
            lambda: self.fallback.breaker_sync(name, cfg, calls, failures, slow, earlier, age),
        )

    def breaker_acquire(self, name, cfg):
        def remote():
            raw = self._breaker_call(name, cfg, "acquire")
            return bool(int(raw[0])), self._snap(raw[1:])

        return self._run(
            "breaker_acquire", remote, lambda: self.fallback.breaker_acquire(name, cfg)
        )

    def breaker_result(self, name, cfg, generation, outcome):
        return self._run(
            "breaker_result",
            lambda: self._snap(self._breaker_call(name, cfg, "result", generation, outcome)),
            lambda: self.fallback.breaker_result(name, cfg, generation, outcome),
        )

    def breaker_force(self, name, cfg, state, duration):
        if state not in ("open", "closed", "half_open"):
            raise ConfigError(f"unknown breaker state {state!r}")
        duration = min(duration, 10 * 365 * 86400.0)  # "forever" must stay a finite number
        return self._run(
            "breaker_force",
            lambda: self._snap(self._breaker_call(name, cfg, "force", state, duration)),
            lambda: self.fallback.breaker_force(name, cfg, state, duration),
        )

    def breaker_read(self, name, cfg):
        return self._run(
            "breaker_read",
            lambda: self._snap(self._breaker_call(name, cfg, "read")),
            lambda: self.fallback.breaker_read(name, cfg),
        )

    # -- rate limit
    def gcra(self, key, rate, burst, cost=1):
        def remote():
            raw = self._gcra(
                keys=[self.key("ratelimit", key)],
                args=[self._now_arg(), repr(1.0 / rate), burst, cost],
            )
            return bool(int(raw[0])), float(raw[1])

        return self._run("gcra", remote, lambda: self.fallback.gcra(key, rate, burst, cost))

    # -- retry budget
    def _budget_call(self, op, name, requests, ratio, floor, window):
        return self._budget(
            keys=[self.key("budget", name, "window")],
            args=[self._now_arg(), op, requests, ratio, floor, window, BUCKETS_PER_WINDOW],
        )

    def budget_add(self, name, requests, window):
        self._run(
            "budget_add",
            lambda: self._budget_call("add", name, requests, 0, 0, window),
            lambda: self.fallback.budget_add(name, requests, window),
        )

    def budget_spend(self, name, requests, ratio, floor, window):
        return self._run(
            "budget_spend",
            lambda: bool(int(self._budget_call("spend", name, requests, ratio, floor, window))),
            lambda: self.fallback.budget_spend(name, requests, ratio, floor, window),
        )

    def clear(self) -> int:
        """Delete every key under this store's prefix (tests and operators). Returns the count."""
        n = 0
        for pattern in (f"{{{self.prefix}:*", f"{self.prefix}:*"):
            for k in self.client.scan_iter(match=pattern, count=500):
                n += self.client.delete(k)
        return n


# --------------------------------------------------------------------------- caches


class CacheEntry(NamedTuple):
    value: Any
    age: float  # seconds since it was stored


@runtime_checkable
class Cache(Protocol):
    """Last good values for the cached-value fallback. Errors never escape a cache."""

    def get(self, key: str) -> CacheEntry | None: ...

    def set(self, key: str, value: Any, ttl: float) -> None: ...


@dataclass
class _Stored:
    value: Any
    stored_at: float
    expires_at: float


class MemoryCache:
    """A bounded in-process cache (oldest entries evicted first)."""

    def __init__(self, max_entries: int = 10_000, clock: Clock = SYSTEM_CLOCK) -> None:
        if max_entries < 1:
            raise ConfigError(f"cache max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.clock = clock
        self._data: dict[str, _Stored] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> CacheEntry | None:
        now = self.clock.now()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if now >= item.expires_at:
                del self._data[key]
                return None
            return CacheEntry(item.value, now - item.stored_at)

    def set(self, key: str, value: Any, ttl: float) -> None:
        now = self.clock.now()
        with self._lock:
            self._data.pop(key, None)
            self._data[key] = _Stored(value, now, now + ttl)
            while len(self._data) > self.max_entries:
                del self._data[next(iter(self._data))]


class RedisCache:
    """Cache in Redis, JSON by default. A Redis error reads as a miss and skips the write."""

    def __init__(
        self,
        client: Any,
        prefix: str = "tidegate",
        *,
        dumps: Callable[[Any], str] = json.dumps,
        loads: Callable[[str | bytes], Any] = json.loads,
    ) -> None:
        import redis

        _check_timeouts(client)
        self.client = client
        self.prefix = prefix
        self.dumps = dumps
        self.loads = loads
        self._errors = (redis.exceptions.RedisError, OSError)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:cache:{key}"

    def get(self, key: str) -> CacheEntry | None:
        try:
            raw = self.client.get(self._key(key))
            if raw is None:
                return None
            doc = json.loads(raw)
            return CacheEntry(self.loads(doc["v"]), max(0.0, time.time() - doc["t"]))
        except self._errors:
            metrics.STORE_ERRORS.labels(store="redis_cache", operation="get").inc()
            return None
        except (ValueError, KeyError, TypeError):
            return None

    def set(self, key: str, value: Any, ttl: float) -> None:
        try:
            doc = json.dumps({"v": self.dumps(value), "t": time.time()})
            self.client.set(self._key(key), doc, px=max(1, math.ceil(ttl * 1000)))
        except self._errors:
            metrics.STORE_ERRORS.labels(store="redis_cache", operation="set").inc()
        except (TypeError, ValueError):
            log.warning("value for cache key %s is not serialisable; not cached", key)
