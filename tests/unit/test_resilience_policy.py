"""Rate limit, bulkhead, timeout, fallbacks, and the composed policy."""

import asyncio
import threading

import pytest

from resilience import deadline as dl
from resilience.bulkhead import Bulkhead, BulkheadConfig
from resilience.clock import FakeClock
from resilience.errors import (
    AttemptTimeout,
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    DeferralError,
    PermanentError,
    RateLimited,
    Shed,
    TransientError,
)
from resilience.fallback import (
    CachedValue,
    CallContext,
    DefaultValue,
    Deferred,
    Graceful,
    MemoryDeferralSink,
    QueueForLater,
    Unavailable,
)
from resilience.policy import FallbackSpec, Policy, PolicyConfig, PolicyRegistry, build_policies
from resilience.ratelimit import RateLimitConfig, RateLimiter
from resilience.retry import RetryConfig
from resilience.shedding import LoadShedder, Priority
from resilience.stores import MemoryCache, MemoryStore
from resilience.timeout import Timeout


def test_gcra_burst_then_rate_per_key():
    clock = FakeClock()
    rl = RateLimiter("api", RateLimitConfig(rate=10, burst=3), MemoryStore(clock), clock)
    assert [rl.try_acquire("a")[0] for _ in range(4)] == [True, True, True, False]
    allowed, retry_after = rl.try_acquire("a")
    assert not allowed and retry_after == pytest.approx(0.1)
    assert rl.try_acquire("b")[0]  # another client is not affected
    clock.advance(0.1)
    rl.acquire("a")
    with pytest.raises(RateLimited) as info:
        rl.acquire("a")
    assert info.value.retry_after == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        RateLimitConfig(rate=0)


def test_bulkhead_limits_and_rejects():
    bh = Bulkhead("d", BulkheadConfig(max_concurrent=2))
    release = threading.Event()
    futures = [bh.submit(release.wait, 5) for _ in range(2)]
    with pytest.raises(BulkheadFull):
        bh.submit(lambda: None)
    release.set()
    for f in futures:
        f.result(timeout=5)
    assert bh.call(lambda: 1) == 1
    with pytest.raises(ConfigError):
        BulkheadConfig(max_concurrent=0)
    bh.shutdown()


def test_timeout_abandons_work_which_stays_bounded_by_the_bulkhead():
    bh = Bulkhead("d", BulkheadConfig(max_concurrent=1))
    release = threading.Event()
    t = Timeout(0.05, bh)
    with pytest.raises(AttemptTimeout):
        t.call(release.wait, 5)
    assert bh.in_use == 1  # the abandoned call still holds its slot
    with pytest.raises(BulkheadFull):
        t.call(lambda: None)
    release.set()
    for _ in range(500):  # bounded polling for the abandoned thread to finish
        if bh.in_use == 0:
            break
        threading.Event().wait(0.01)
    assert t.call(lambda: 5) == 5
    with pytest.raises(ConfigError):
        Timeout(None, bh)
    with pytest.raises(ConfigError):
        Timeout(float("inf"), bh)
    bh.shutdown()


def test_timeout_budget_and_client_timeout_visible_inside_the_call():
    clock = FakeClock()
    t = Timeout(0.08, Bulkhead("d"), clock)
    with dl.deadline_scope(0.05, clock=clock):
        assert t.call(lambda: dl.client_timeout(1.0)) == pytest.approx(0.05)
    assert t.call(lambda: dl.client_timeout(1.0)) == pytest.approx(0.08)


def test_async_timeout():
    t = Timeout(0.05, Bulkhead("d"))

    async def hang():
        await asyncio.sleep(5)

    async def quick():
        return dl.client_timeout(1.0)

    with pytest.raises(AttemptTimeout):
        asyncio.run(t.acall(hang))
    assert asyncio.run(t.acall(quick)) == pytest.approx(0.05, abs=0.01)
    assert t.bulkhead.in_use == 0


def ctx(**kw):
    return CallContext("pricing", "get_price", ("sku",), {}, **kw)


def test_fallback_strategies_compose_in_order():
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    cached = CachedValue(cache, ttl=300)
    chain = cached | DefaultValue(list)
    err = CircuitOpen()
    assert chain.recover(ctx(), err) == []  # nothing cached yet
    chain.on_success(ctx(), [1, 2])
    clock.advance(299)
    assert chain.recover(ctx(), err) == [1, 2]
    clock.advance(2)
    assert chain.recover(ctx(), err) == []  # older than the TTL: not served
    g = Graceful("Comments temporarily unavailable").recover(ctx(), err)
    assert g == Unavailable("pricing", "circuit_open", "Comments temporarily unavailable",
                            "not_attempted")


def test_queue_for_later_never_loses_silently():
    sink = MemoryDeferralSink()
    d = QueueForLater(sink).recover(ctx(idempotency_key="k1"), TransientError("down"))
    assert isinstance(d, Deferred) and sink.requests[d.id].idempotency_key == "k1"

    class Broken:
        def defer(self, request):
            raise ConnectionError("sqs down")

    with pytest.raises(DeferralError):
        QueueForLater(Broken()).recover(ctx(), TransientError("down"))
    fallback = QueueForLater(Broken()) | Graceful()
    assert isinstance(fallback.recover(ctx(), TransientError("down")), Unavailable)


def test_policy_from_mapping_units_defaults_and_errors():
    cfg = PolicyConfig.from_mapping(
        "search",
        {
            "queue": "search",
            "idempotent": True,
            "timeout_ms": 160,
            "deadline_ms": 400,
            "retry": {"max_attempts": 3, "base_s": 0.01, "max_wait_s": 1},
            "breaker": {"failure_rate": 0.6, "window_s": 5, "open_s": 10, "slow_call_ms": 300},
            "bulkhead": {"max_concurrent": 50, "max_wait_ms": 10},
            "rate_limit": {"rate_per_s": 100, "burst": 20},
            "fallback": {"kind": "default", "value": []},
        },
    )
    assert (cfg.timeout, cfg.deadline, cfg.retry.base, cfg.breaker.slow_call_duration) == (
        0.16,
        0.4,
        0.01,
        0.3,
    )
    assert (
        cfg.bulkhead.max_wait == 0.01
        and cfg.rate_limit.burst == 20
        and cfg.breaker.minimum_calls == 10
    )
    seed = PolicyConfig.from_mapping("x", {})
    assert (seed.timeout, seed.deadline, seed.retry_config.max_attempts) == (0.08, 0.2, 4)
    with pytest.raises(ConfigError, match=r"dependencies\.x\.breaker\.speed"):
        PolicyConfig.from_mapping("x", {"breaker": {"speed": 1}})
    with pytest.raises(ConfigError, match=r"dependencies\.x\.colour"):
        PolicyConfig.from_mapping("x", {"colour": "red"})
    with pytest.raises(ConfigError, match="not idempotent"):
        PolicyConfig.from_mapping("x", {"idempotent": False, "retry": {"max_attempts": 3}})
    with pytest.raises(ConfigError, match="kind"):
        PolicyConfig.from_mapping("x", {"fallback": {"kind": "magic"}})
    with pytest.raises(ConfigError, match="deadline"):
        PolicyConfig.from_mapping("x", {"timeout_ms": 300, "deadline_ms": 200})
    with pytest.raises(ConfigError, match="sink"):
        build_policies({"email": {"fallback": {"kind": "queue"}}})


def flaky(n, exc=ConnectionError):
    state = {"calls": 0}

    def fn(x):
        state["calls"] += 1
        if state["calls"] <= n:
            raise exc("down")
        return x * 2

    return fn, state


def test_policy_retries_idempotent_only_and_keyed_calls():
    cfg = dict(timeout=0.5, deadline=2.0, retry=RetryConfig(in_call_attempts=3))
    p = Policy(PolicyConfig(name="search", idempotent=True, **cfg))
    fn, state = flaky(2)
    assert p.call(fn, 21) == 42 and state["calls"] == 3
    clock = FakeClock()
    pay = Policy(PolicyConfig(name="payments", timeout=0.5, deadline=10.0), clock=clock)
    fn, state = flaky(2)
    with pytest.raises(ConnectionError):
        pay.call(fn, 1)  # non-idempotent, no key: fail fast
    assert state["calls"] == 1
    fn, state = flaky(1)
    assert pay.call(fn, 1, idempotency_key="order-1") == 2 and state["calls"] == 2
    assert 0.0 <= clock.sleeps[0] <= 0.02  # in the call: the short scale, keyed calls too


def test_policy_fallback_on_open_circuit_not_on_permanent():
    sink = MemoryDeferralSink()
    p = Policy(
        PolicyConfig(
            name="email",
            idempotent=True,
            timeout=0.5,
            deadline=1.0,
            fallback=FallbackSpec(kind="queue"),
        ),
        deferral_sink=sink,
    )
    p.breaker.force_open()
    result = p.call(lambda to: "sent", "a@b", idempotency_key="m1", priority="low")
    assert isinstance(result, Deferred)
    req = sink.requests[result.id]
    assert (req.args, req.priority, req.idempotency_key) == (("a@b",), Priority.LOW, "m1")
    p.breaker.reset()

    def bad():
        raise PermanentError("bad address")

    with pytest.raises(PermanentError):
        p.call(bad)


def test_policy_outer_layers_rate_limit_and_shedding():
    clock = FakeClock()
    p = Policy(
        PolicyConfig(
            name="api", timeout=0.5, deadline=1.0, rate_limit=RateLimitConfig(rate=1, burst=1)
        ),
        clock=clock,
        shedder=LoadShedder(lambda: 0.85),
    )
    assert p.call(lambda: 1, client="c1") == 1
    with pytest.raises(RateLimited):
        p.call(lambda: 1, client="c1")
    with pytest.raises(Shed):
        p.call(lambda: 1, client="c2", priority=Priority.LOW)
    assert p.call(lambda: 1, client="c3", priority=Priority.CRITICAL) == 1


def test_policy_cached_fallback_written_on_success():
    p = Policy(
        PolicyConfig(
            name="pricing",
            idempotent=True,
            timeout=0.5,
            deadline=1.0,
            fallback=FallbackSpec(kind="cached", ttl=300),
        ),
        cache=MemoryCache(),
    )
    assert p.call(lambda sku: 9.99, "sku-1") == 9.99
    p.breaker.force_open()
    assert p.call(lambda sku: 0, "sku-1") == 9.99
    with pytest.raises(CircuitOpen):
        p.call(lambda sku: 0, "sku-2")  # nothing cached for it


def test_policy_async_and_decorator():
    p = Policy(
        PolicyConfig(
            name="s",
            idempotent=True,
            timeout=0.5,
            deadline=1.0,
            retry=RetryConfig(base=0.001),
            fallback=FallbackSpec(kind="graceful"),
        )
    )
    state = {"n": 0}

    @p.guard
    async def fetch(x):
        state["n"] += 1
        if state["n"] == 1:
            raise TransientError("blip")
        return x

    assert asyncio.run(fetch(3)) == 3 and state["n"] == 2

    @p.guard
    def sync(x):
        return x + 1

    assert sync(1) == 2
    p.breaker.force_open()
    assert isinstance(asyncio.run(fetch(3)), Unavailable)


def test_registry():
    reg = PolicyRegistry.from_tables({"search": {"idempotent": True}})
    assert reg.policy("search") is reg["search"] and reg.breaker("search") is reg["search"].breaker
    assert "other" not in reg
    with pytest.raises(ConfigError, match="unknown dependency 'serch'; did you mean 'search'"):
        reg.policy("serch")  # a typo is an error, never the seed's defaults in silence
    assert reg.add(PolicyConfig(name="other")).config.timeout == 0.08
    assert reg.policy("other").config.timeout == 0.08
    assert reg.names() == ["other", "search"]
    with pytest.raises(ConfigError, match="already registered"):
        reg.add(PolicyConfig(name="other"))


def test_a_replayed_request_keeps_its_deferral_history_and_is_capped():
    import time

    from resilience.fallback import MemoryDeferralSink, NoFallback, replay_lineage

    sink = MemoryDeferralSink()
    fallback = QueueForLater(sink, max_deferrals=3)
    ctx = CallContext("email", "email.send", ("a@example.com",), idempotency_key="k9")
    first = fallback.recover(ctx, TransientError("down"))
    stored = sink.requests[first.id]
    assert stored.deferrals == 1
    # the replayer published it with its history; the dependency fails again
    with replay_lineage(stored.deferrals, stored.first_deferred_at):
        again = sink.requests[fallback.recover(ctx, TransientError("down again")).id]
    assert again.deferrals == 2 and again.first_deferred_at == stored.first_deferred_at
    with replay_lineage(2, stored.first_deferred_at):
        assert sink.requests[fallback.recover(ctx, TransientError("x")).id].deferrals == 3
    with replay_lineage(3, stored.first_deferred_at), pytest.raises(NoFallback,
                                                                    match="deferred 3 times"):
        fallback.recover(ctx, TransientError("still down"))
    assert len(sink.requests) == 3  # the fourth was not stored: the caller's error surfaces
    with replay_lineage(0, None):  # a fresh request: history starts now
        fresh = sink.requests[fallback.recover(ctx, TransientError("x")).id]
    assert fresh.deferrals == 1 and abs(fresh.first_deferred_at - time.time()) < 60
    assert PolicyConfig.from_mapping(
        "email", {"fallback": {"kind": "queue", "max_deferrals": 2}}).fallback.max_deferrals == 2
    with pytest.raises(ConfigError, match="max_deferrals"):
        PolicyConfig.from_mapping("email", {"fallback": {"kind": "queue", "max_deferrals": 0}})
