"""Shared state on real Redis across processes (spawned, as Celery prefork children are not)."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import redis

from resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from resilience.clock import FakeClock
from resilience.errors import CircuitOpen, TransientError
from resilience.stores import RedisStore, redis_client

from . import _redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CTX = mp.get_context("spawn")


@pytest.fixture
def prefix():
    try:
        _redis.client().ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {_redis.REDIS_URL}: {exc}")
    p = _redis.new_prefix()
    yield p
    RedisStore(_redis.client(), prefix=p).clear()  # our prefix only


def test_lua_breaker_follows_the_same_transitions_on_a_driven_clock(prefix):
    clock = FakeClock(start=1_000_000.0)
    store = RedisStore(_redis.client(), prefix=prefix, clock=clock)
    cfg = BreakerConfig(minimum_calls=4, open_duration=30.0)
    b = CircuitBreaker("lua", cfg, store, clock)
    for _ in range(4):
        b.record(b.acquire(), TransientError("x"), 0.001)
    assert b.state is BreakerState.OPEN
    clock.advance(30)
    trial = b.acquire()
    assert trial.probe
    with pytest.raises(CircuitOpen):
        b.acquire()
    b.record(trial, None, 0.01)
    assert b.state is BreakerState.CLOSED
    assert store.client.exists(store.key("breaker", "lua", "state"))
    assert store.key("breaker", "lua", "state") == "{" + prefix + ":breaker:lua}:state"


def test_failures_in_one_process_open_the_breaker_for_all(prefix):
    cfg = {"minimum_calls": 5, "window": 10.0, "open_duration": 30.0, "sync_interval": 0.25}
    results = _redis.open_in_one_process(CTX, prefix, "shared", cfg, watchers=3, ready_s=30,
                                         collect_s=30)
    assert [r[0] for r in results] == ["open"] * 4, results


def test_half_open_lets_exactly_one_trial_through_cluster_wide(prefix):
    cfg = {"minimum_calls": 5, "open_duration": 3.0, "half_open_calls": 1, "sync_interval": 0.25}
    _redis.breaker(prefix, "probe", **cfg).force_open(3.0)
    out, stop = CTX.Queue(), CTX.Event()
    procs = [
        CTX.Process(target=_redis.grab_trials, args=(prefix, "probe", cfg, stop, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    first = _redis.collect(out, 1, 30)
    assert first and first[0][0] == "probe", first
    time.sleep(1.0)  # an observation window (under the 3 s probe lease), not synchronisation
    stop.set()
    rest = _redis.collect(out, 4, 30)
    for p in procs:
        p.join(10)
    grants = [r for r in first + rest if r[0] != "done"]
    assert grants == first, f"more than one trial call ran: {grants}"
    b = _redis.breaker(prefix, "probe", **cfg)
    assert _redis.wait_until(lambda: b.state is BreakerState.CLOSED)


def test_global_rate_limit_holds_across_processes(prefix):
    rate, seconds, burst = 50.0, 3.0, 10  # 10: see _redis.check_global_limit
    results, start = _redis.hammer_together(CTX, prefix, "global", rate, burst, seconds,
                                            processes=4, ready_s=40, collect_s=40)
    assert len(results) == 4
    _redis.check_global_limit(results, rate, burst, start, seconds)


def test_redis_down_never_fails_a_call_and_says_so():
    from prometheus_client import REGISTRY

    dead = redis_client("redis://127.0.0.1:1/0", socket_timeout=0.05, socket_connect_timeout=0.05)
    store = RedisStore(dead, prefix="down", name="redis-down-test")
    b = CircuitBreaker("down", BreakerConfig(minimum_calls=3), store)
    assert b.call(lambda: 1) == 1
    assert store.degraded
    assert (
        REGISTRY.get_sample_value("tidegate_state_store_degraded", {"store": "redis-down-test"})
        == 1
    )
    for _ in range(3):
        with pytest.raises(TransientError):
            b.call(lambda: (_ for _ in ()).throw(TransientError("x")))
    assert b.state is BreakerState.OPEN  # still protects, on local state


def test_client_without_timeouts_is_refused():
    from resilience.errors import ConfigError

    with pytest.raises(ConfigError, match="socket_timeout"):
        RedisStore(redis.Redis.from_url(_redis.REDIS_URL))


def test_a_batch_of_rate_limit_decisions_is_what_one_at_a_time_would_be(prefix):
    """``try_acquire_many`` (one pipelined round trip) decides each key in order, as the same
    calls one at a time do; a dead Redis falls back to local state for all of them."""
    from resilience.ratelimit import RateLimitConfig, RateLimiter

    clock = FakeClock()
    config = RateLimitConfig(rate=1.0, burst=2)
    batched = RateLimiter("batch", config, RedisStore(_redis.client(), prefix=prefix,
                                                      clock=clock))
    single = RateLimiter("single", config, RedisStore(_redis.client(), prefix=prefix,
                                                      clock=clock))
    keys = ["a", "a", "b", "a", "b", "b", "c"]
    got = batched.try_acquire_many(keys)
    assert [allowed for allowed, _ in got] == [True, True, True, False, True, False, True]
    assert got == [single.try_acquire(k) for k in keys]
    assert got[3][1] == pytest.approx(1.0)  # a's next token is a second away
    clock.advance(1.0)
    assert [a for a, _ in batched.try_acquire_many(["a", "a"])] == [True, False]

    dead = redis_client("redis://127.0.0.1:1/0", socket_timeout=0.05,
                        socket_connect_timeout=0.05)
    local = RateLimiter("dead", config, RedisStore(dead, prefix="down", name="gcra-down-test"))
    assert [a for a, _ in local.try_acquire_many(["x", "x", "x"])] == [True, True, False]
