"""Hedged attempts: first success wins, paid from the retry budget, idempotent only."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from resilience.chain import Chain
from resilience.clock import SYSTEM_CLOCK
from resilience.errors import ConfigError, DeadlineExceeded, TransientError
from resilience.events import EventBus, Hedged
from resilience.hedge import HedgeConfig
from resilience.layers import HedgeLayer
from resilience.policy import Policy, PolicyConfig
from resilience.retry import RetryBudget


def layer(budget: RetryBudget | None = None, **kw) -> tuple[HedgeLayer, list]:
    bus, seen = EventBus(), []
    bus.subscribe(seen.append, Hedged)
    h = HedgeLayer("search", HedgeConfig(**{"delay": 0.01, "max": 1, **kw}),
                   budget or RetryBudget(name="search"), pool_size=8, events=bus)
    return h, seen


def test_a_slow_first_attempt_is_overtaken_by_the_hedge():
    h, seen = layer()
    release = threading.Event()
    calls = []

    def fetch() -> str:
        calls.append(1)
        if len(calls) == 1:  # the first attempt hangs until the test ends
            release.wait(30)
            return "slow"
        return "fast"

    try:
        assert Chain([h]).call(fetch) == "fast"
    finally:
        release.set()
    assert [e.result for e in seen] == ["started", "won"]


def test_no_budget_no_hedge_the_first_attempt_is_awaited():
    h, seen = layer(RetryBudget(ratio=0, min_per_second=0, name="search"))
    release = threading.Event()
    calls = []

    def fetch() -> int:
        calls.append(1)
        release.wait(0.1)
        return len(calls)

    assert Chain([h]).call(fetch) == 1
    assert [e.result for e in seen] == ["refused"]


def test_a_fast_failure_is_raised_at_once_without_a_hedge():
    h, seen = layer(max=3)

    def fetch() -> None:
        raise TransientError("503")

    with pytest.raises(TransientError, match="503"):
        Chain([h]).call(fetch)
    assert seen == []


def test_a_failed_hedge_waits_for_the_first_attempt():
    h, seen = layer(max=2)
    calls = []
    lock = threading.Lock()

    def fetch() -> str:
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 1:
            threading.Event().wait(0.2)
            return "first"
        raise TransientError("hedge failed")

    assert Chain([h]).call(fetch) == "first"
    assert [e.result for e in seen].count("started") == 2


def test_async_hedge_wins_and_the_loser_is_cancelled():
    h, seen = layer()
    cancelled = []

    async def fetch(n: list) -> str:
        n.append(1)
        if len(n) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return "slow"
        return "fast"

    async def main() -> str:
        result = await Chain([h]).acall(fetch, [])
        await asyncio.sleep(0)
        return result

    assert asyncio.run(main()) == "fast"
    assert cancelled == [True]
    assert [e.result for e in seen] == ["started", "won"]


@pytest.mark.parametrize("kw, message", [
    ({"delay": 0}, "delay must be > 0"),
    ({"delay": 0.05, "max": 4}, "from 1 to 3"),
])
def test_bad_hedge_config(kw, message):
    with pytest.raises(ConfigError, match=message):
        HedgeConfig(**kw)


def test_policy_file_hedge_is_refused_for_a_non_idempotent_dependency():
    with pytest.raises(ConfigError, match="not idempotent, so it may not hedge"):
        PolicyConfig.from_mapping("payments", {"hedge": {"delay_ms": 50}})
    cfg = PolicyConfig.from_mapping("search", {"idempotent": True,
                                               "hedge": {"delay_ms": 50, "max": 2}})
    assert cfg.hedge == HedgeConfig(delay=0.05, max=2)
    assert "RetryLayer > HedgeLayer > BreakerLayer" in repr(Policy(cfg).chain)


def test_hedges_stop_at_the_deadline_and_the_wait_ends_there():
    from resilience.layers import DeadlineLayer

    h, seen = layer(delay=0.02, max=3)
    release = threading.Event()

    def hang() -> None:
        release.wait(30)

    start = time.monotonic()
    try:
        with pytest.raises(DeadlineExceeded):
            Chain([DeadlineLayer(0.1, SYSTEM_CLOCK), h]).call(hang)
    finally:
        release.set()
    assert time.monotonic() - start < 10  # not the 30 s the attempts would take
    assert [e.result for e in seen].count("started") <= 3


def test_hedge_delay_p95_follows_the_latency_window_from_its_initial_value():
    """delay = "p95": half the attempt timeout until 20 attempts are in, then the window's
    95th percentile (refreshed at most once a second as the stats fold), never below the
    floor."""
    from prometheus_client import REGISTRY

    from resilience.clock import FakeClock

    clock = FakeClock()
    cfg = PolicyConfig.from_mapping("search", {"idempotent": True, "timeout_ms": 80,
                                               "deadline_ms": 200, "hedge": {"delay": "p95"}})
    assert cfg.hedge == HedgeConfig(percentile="p95", floor=0.005, initial=0.04)
    p = Policy(cfg, clock=clock)
    layer_delay = next(x for x in p.chain.layers if isinstance(x, HedgeLayer)).delay
    assert layer_delay is p.hedge_delay and p.hedge_delay.seconds == 0.04

    def feed(durations):
        for d in durations:
            p.stats.success(d)
        clock.advance(1.0)
        p.stats.fold()

    feed([0.010] * 10)  # too few samples: still the initial delay
    assert p.hedge_delay.seconds == 0.04
    feed([0.010] * 90 + [0.030] * 10)  # 110 samples, 10 slow ones: p95 is the slow value
    assert p.hedge_delay.seconds == pytest.approx(0.030)
    assert REGISTRY.get_sample_value("tidegate_hedge_delay_seconds",
                                     {"dependency": "search"}) == pytest.approx(0.030)
    feed([0.001] * 2000)  # a very fast dependency: the floor (5 ms by default) holds
    assert p.hedge_delay.seconds == pytest.approx(0.005)
    fixed = Policy(PolicyConfig.from_mapping("s2", {"idempotent": True,
                                                    "hedge": {"delay_ms": 35}}))
    assert fixed.hedge_delay.seconds == 0.035 and fixed.hedge_delay.q is None


@pytest.mark.parametrize("table, message", [
    ({"delay": "p95", "delay_ms": 30}, "not both"),
    ({"delay": "p100"}, 'from "p50" to "p99"'),
    ({"delay_ms": 30, "floor_ms": 2}, 'go with delay = "p95"'),
    ({"max": 2}, 'needs delay_ms or delay = "p95"'),
])
def test_bad_hedge_delay_in_the_policy_table(table, message):
    with pytest.raises(ConfigError, match=message):
        PolicyConfig.from_mapping("search", {"idempotent": True, "hedge": table})


def test_the_policy_file_schema_checks_hedge_delay():
    from workers.policy_file import parse_policy

    def parsed(hedge):
        return parse_policy({"dependencies": {"search": {
            "url": "http://127.0.0.1:1", "queue": "search", "idempotent": True,
            "hedge": hedge}}})

    parsed({"delay": "p95", "floor_ms": 3, "initial_ms": 40, "max": 2})
    for hedge, message in [({"delay": 95}, 'percentile from "p50" to "p99"'),
                           ({"delay": "p95", "delay_ms": 30}, "one of them"),
                           ({}, "one of them"),
                           ({"delay_ms": 30, "initial_ms": 5}, 'go with delay = "p95"')]:
        with pytest.raises(ConfigError, match=message) as err:
            parsed(hedge)
        assert "dependencies.search.hedge" in str(err.value)
