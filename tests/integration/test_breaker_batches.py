"""A breaker's local batch of successes lands in the bucket where it happened, on both stores.

The Lua script and the memory store must agree: successes merged with an age older than the
window are gone (they cannot dilute the failures that follow); recent ones still count.
"""

from __future__ import annotations

import pytest
import redis

from resilience.breaker import BreakerConfig
from resilience.clock import FakeClock
from resilience.stores import MemoryStore, RedisStore

from . import _redis

pytestmark = pytest.mark.integration

CFG = BreakerConfig(minimum_calls=2, failure_rate=0.5, window=10.0, open_duration=30.0)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    clock = FakeClock()
    if request.param == "memory":
        yield MemoryStore(clock)
        return
    try:
        _redis.client().ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis at {_redis.REDIS_URL}: {exc}")
    s = RedisStore(_redis.client(), prefix=_redis.new_prefix(), clock=clock)
    yield s
    s.clear()


def test_recent_batch_counts(store):
    store.breaker_sync("recent", CFG, 0, 0, 0, earlier=3, age=0.5)
    snap = store.breaker_sync("recent", CFG, 1, 1, 0)  # 1 failure in 4 calls
    assert snap.state == "closed"
    snap = store.breaker_sync("recent", CFG, 1, 1, 0)  # 2 in 5
    assert snap.state == "closed"


def test_batch_older_than_the_window_is_dropped(store):
    store.breaker_sync("stale", CFG, 0, 0, 0, earlier=3, age=30.0)
    assert store.breaker_sync("stale", CFG, 1, 1, 0).state == "closed"  # 1 call < minimum 2
    assert store.breaker_sync("stale", CFG, 1, 1, 0).state == "open"  # 2 of 2, not 2 of 5
