"""One chain of layers, composed by listing: the policy's default list, subsets, custom layers."""

from __future__ import annotations

import asyncio

import pytest

from resilience import deadline as dl
from resilience.breaker import BreakerConfig, CircuitBreaker
from resilience.chain import Call, Chain
from resilience.clock import FakeClock
from resilience.errors import AttemptTimeout, CircuitOpen, ConfigError, TransientError
from resilience.layers import BreakerLayer, DeadlineLayer, RetryLayer, TimeoutLayer
from resilience.policy import DEFAULT_LAYERS, Policy, PolicyConfig
from resilience.retry import Retrier, RetryConfig
from resilience.timeout import Timeout


def test_the_default_order_is_one_list():
    assert list(DEFAULT_LAYERS) == ["rate_limit", "shedding", "fallback", "deadline", "retry",
                                    "hedge", "breaker", "bulkhead", "adaptive_limit", "timeout"]
    p = Policy(PolicyConfig(name="order"))
    # no rate limit, shedder or fallback configured: those layers are left out
    assert repr(p.chain) == "DeadlineLayer > RetryLayer > BreakerLayer > BulkheadLayer > " \
                            "TimeoutLayer"


def test_a_policy_runs_any_subset_in_the_order_given():
    clock = FakeClock()
    p = Policy(PolicyConfig(name="subset", idempotent=True,
                            retry=RetryConfig(max_attempts=3, in_call_attempts=3)),
               clock=clock, layers=("breaker", "retry"))
    assert repr(p.chain) == "BreakerLayer > RetryLayer"
    n = {"calls": 0}

    def flaky():
        n["calls"] += 1
        if n["calls"] < 3:
            raise TransientError("blip")
        return "ok"

    assert p.call(flaky) == "ok" and n["calls"] == 3  # retried inside the breaker's one permit
    with pytest.raises(ConfigError, match="did you mean 'breaker'"):
        Policy(PolicyConfig(name="typo"), layers=("braker",))


def test_a_chain_built_in_code_with_a_custom_layer():
    seen = []

    class Audit:
        """A user's own layer: it sees every attempt below the retry layer."""

        def call(self, next, c: Call):
            seen.append(c.attempt)
            return next(c)

        async def acall(self, next, c: Call):
            seen.append(c.attempt)
            return await next(c)

    clock = FakeClock()
    retry = RetryLayer(Retrier(RetryConfig(max_attempts=3, base=0.001), clock=clock),
                       idempotent=True)
    chain = Chain([retry, Audit()])
    n = {"calls": 0}

    def flaky(x):
        n["calls"] += 1
        if n["calls"] == 1:
            raise TransientError("blip")
        return x * 2

    assert chain.call(flaky, 21) == 42
    assert seen == [1, 2]
    seen.clear()
    n["calls"] = 1

    async def doubled(x):
        return x * 2

    assert asyncio.run(chain.acall(doubled, 4)) == 8 and seen == [1]


def test_a_timeout_needs_no_bulkhead():
    clock = FakeClock()
    t = Timeout(0.05, clock=clock, mode="cooperative")
    assert t.bulkhead is None
    assert t.call(lambda: dl.client_timeout(1.0)) == pytest.approx(0.05)

    def late():
        clock.advance(0.06)
        return "late"

    with pytest.raises(AttemptTimeout):
        Chain([TimeoutLayer(t)]).call(late)
    abandon = Timeout(0.5)  # its own bounded pool
    assert abandon.call(lambda: 3) == 3


def test_a_deadline_layer_reaches_the_callee_without_a_timeout_layer():
    clock = FakeClock()
    chain = Chain([DeadlineLayer(0.3, clock)])
    assert chain.call(lambda: dl.client_timeout(1.0)) == pytest.approx(0.3)
    assert dl.current() is None
    with dl.deadline_scope(0.1, clock=clock):  # an enclosing tighter deadline wins
        assert chain.call(lambda: dl.client_timeout(1.0)) == pytest.approx(0.1)


def test_breaker_layer_alone_refuses_while_open():
    clock = FakeClock()
    breaker = CircuitBreaker("alone", BreakerConfig(minimum_calls=1), clock=clock)
    chain = Chain([BreakerLayer(breaker)])

    def down():
        raise TransientError("down")

    with pytest.raises(TransientError):
        chain.call(down)
    with pytest.raises(CircuitOpen):
        chain.call(lambda: 1)


def test_the_policy_file_orders_the_layers():
    seed = ["rate_limit", "deadline", "breaker", "retry", "bulkhead", "timeout", "fallback"]
    cfg = PolicyConfig.from_mapping("p", {"idempotent": True, "layers": seed,
                                          "fallback": {"kind": "default"}})
    assert cfg.layers == tuple(seed)
    assert repr(Policy(cfg).chain) == ("DeadlineLayer > BreakerLayer > RetryLayer > "
                                       "BulkheadLayer > TimeoutLayer > FallbackLayer")
    assert PolicyConfig.from_mapping("p", {}).layers is None  # the default order
    with pytest.raises(ConfigError, match="did you mean 'breaker'"):
        PolicyConfig.from_mapping("p", {"layers": ["braker"]})
    with pytest.raises(ConfigError, match="listed twice"):
        PolicyConfig.from_mapping("p", {"layers": ["retry", "retry"]})


def test_timeout_p99x2_follows_the_p99_within_floor_and_ceiling():
    cfg = PolicyConfig.from_mapping("p", {"timeout_ms": "p99x2", "deadline_ms": 200,
                                          "timeout": {"floor_ms": 20}})
    assert cfg.adaptive_timeout and (cfg.timeout_floor, cfg.timeout_ceiling) == (0.02, 0.1)
    p = Policy(cfg)
    assert p.timeout.seconds == 0.1  # starts at the ceiling
    assert p.follow_p99(0.03) == pytest.approx(0.06) and p.timeout.seconds == pytest.approx(0.06)
    assert p.follow_p99(0.001) == 0.02  # never below the floor
    assert p.follow_p99(10.0) == 0.1  # never above the ceiling
    assert Policy(PolicyConfig(name="fixed")).follow_p99(0.03) is None
    with pytest.raises(ConfigError, match="exceeds ceiling_ms"):
        PolicyConfig.from_mapping("p", {"timeout_ms": "p99x2",
                                        "timeout": {"floor_ms": 50, "ceiling_ms": 40}})
    with pytest.raises(ConfigError, match="adaptive timeout only"):
        PolicyConfig.from_mapping("p", {"timeout_ms": 80, "timeout": {"floor_ms": 10}})


def test_the_callee_reads_a_deadline_and_custom_layers_a_call():
    """The chain carries the call as a plain tuple and publishes plain (expires_at, clock)
    pairs; what a callee reads (current(), remaining(), client_timeout()) and what a layer of
    the user's own gets are still a Deadline and a Call."""
    clock = FakeClock()
    seen = []

    class Peek:
        def call(self, next, c):
            seen.append((type(c), c.attempt, c.deadline[0]))
            return next(c)

        async def acall(self, next, c):
            return await next(c)

    p = Policy(PolicyConfig(name="peek", timeout=0.08, deadline=0.2), clock=clock)
    inside = p.call(lambda: (dl.current(), dl.remaining(), dl.client_timeout(1.0)))
    assert isinstance(inside[0], dl.Deadline)
    assert inside[0].expires_at == pytest.approx(clock.now() + 0.08)
    assert inside[1] == pytest.approx(0.08) and inside[2] == pytest.approx(0.08)
    assert dl.current() is None
    chain = Chain([DeadlineLayer(0.3, clock), Peek(), TimeoutLayer(Timeout(0.1, clock=clock,
                                                                          mode="cooperative"))])
    assert chain.call(dl.remaining) == pytest.approx(0.1)
    assert seen == [(Call, 1, pytest.approx(clock.now() + 0.3))]
