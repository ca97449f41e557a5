"""Layers emit typed events; metrics and logs are subscribers, and so can anyone be."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from resilience import events as ev
from resilience.breaker import BreakerConfig
from resilience.bulkhead import BulkheadConfig
from resilience.clock import FakeClock
from resilience.errors import BulkheadFull, CircuitOpen, RateLimited, Shed, TransientError
from resilience.fallback import MemoryDeferralSink
from resilience.policy import FallbackSpec, Policy, PolicyConfig
from resilience.ratelimit import RateLimitConfig
from resilience.retry import RetryConfig
from resilience.shedding import LoadShedder, Priority


def recorder(bus: ev.EventBus, *types):
    seen: list = []
    bus.subscribe(seen.append, *types)
    return seen


def policy(name: str, bus: ev.EventBus, clock: FakeClock, **kw) -> Policy:
    cfg = PolicyConfig(name=name, idempotent=True, timeout=1.0, deadline=10.0,
                       retry=RetryConfig(max_attempts=3, base=0.001, max_wait=0.002),
                       breaker=BreakerConfig(minimum_calls=2, failure_rate=0.5,
                                             open_duration=30.0, sync_interval=0),
                       **kw)
    return Policy(cfg, clock=clock, events=bus)


def failing():
    raise TransientError("down")


def test_retries_breaker_transitions_rejections_and_outcomes_are_events():
    bus, clock = ev.EventBus(), FakeClock()
    seen = recorder(bus)
    p = policy("ev-a", bus, clock)
    with pytest.raises(Exception):  # noqa: B017 - retries end in RetriesExhausted or CircuitOpen
        p.call(failing)
    retries = [e for e in seen if isinstance(e, ev.RetryScheduled)]
    assert retries and retries[0].dependency == "ev-a" and retries[0].attempt == 1
    assert "TransientError: down" in retries[0].error
    opened = [e for e in seen if isinstance(e, ev.StateTransition) and e.to_state == "open"]
    assert opened == [ev.StateTransition("ev-a", "closed", "open")]
    assert ev.StateTransition("ev-a", None, "closed") in seen  # first state seen: no transition
    seen.clear()
    with pytest.raises(CircuitOpen):
        p.call(lambda: 1)
    rejected = [e for e in seen if isinstance(e, ev.Rejected)]
    assert rejected[0].reason == CircuitOpen.reason
    assert rejected[0].retry_after == pytest.approx(30.0, abs=0.1)
    assert ev.CallFinished("ev-a", "rejected") in seen


def test_fallbacks_deferrals_and_durations_are_events():
    bus, clock = ev.EventBus(), FakeClock()
    seen = recorder(bus, ev.FallbackServed, ev.DeferralAttempted, ev.AttemptDurations)
    sink = MemoryDeferralSink()
    p = Policy(PolicyConfig(name="ev-b", fallback=FallbackSpec(kind="queue")), clock=clock,
               deferral_sink=sink, events=bus)
    assert p.call(lambda: 7) == 7
    p.call(failing)
    assert ev.DeferralAttempted("ev-b", "stored") in seen
    assert ev.FallbackServed("ev-b", "queue") in seen
    p.stats.fold()
    batches = [e for e in seen if isinstance(e, ev.AttemptDurations)]
    assert sum(len(b.durations) for b in batches) == 2  # the failed attempt is timed too


def test_bulkhead_rate_limit_and_shedding_rejections_are_events():
    bus, clock = ev.EventBus(), FakeClock()
    seen = recorder(bus, ev.Rejected, ev.LoadShed)
    load = [0.0]
    p = Policy(PolicyConfig(name="ev-c", bulkhead=BulkheadConfig(max_concurrent=1),
                            rate_limit=RateLimitConfig(rate=1, burst=2)),
               clock=clock, shedder=LoadShedder(lambda: load[0], name="ev-c", events=bus),
               events=bus)
    with pytest.raises(BulkheadFull):
        p.call(lambda: p.call(lambda: 1))
    with pytest.raises(RateLimited):
        p.call(lambda: 1)
    clock.advance(1)
    load[0] = 2.0
    with pytest.raises(Shed):
        p.call(lambda: 1, priority=Priority.LOW)
    reasons = [e.reason for e in seen if isinstance(e, ev.Rejected)]
    assert reasons == [BulkheadFull.reason, RateLimited.reason]
    assert [e.priority for e in seen if isinstance(e, ev.LoadShed)] == ["low"]


def test_a_failing_listener_never_breaks_the_call_and_can_unsubscribe(caplog):
    bus, clock = ev.EventBus(), FakeClock()

    def broken(event):
        raise RuntimeError("listener bug")

    unsubscribe = bus.subscribe(broken)
    p = policy("ev-d", bus, clock)
    with caplog.at_level(logging.ERROR, logger="resilience.events"):
        assert p.call(lambda: 3) == 3
    assert "listener bug" in caplog.text
    unsubscribe()
    seen = recorder(bus)
    caplog.clear()
    with pytest.raises(Exception):  # noqa: B017
        p.call(failing)
    assert seen and "listener bug" not in caplog.text


def test_prometheus_metrics_and_logs_subscribe_to_the_default_bus(caplog):
    clock = FakeClock()
    p = policy("ev-e", ev.EVENTS, clock)
    labels = {"dependency": "ev-e", "from_state": "closed", "to_state": "open"}
    before = REGISTRY.get_sample_value("tidegate_breaker_transitions_total", labels) or 0
    with caplog.at_level(logging.INFO, logger="resilience"), pytest.raises(Exception):  # noqa: B017
        p.call(failing)
    assert REGISTRY.get_sample_value("tidegate_breaker_transitions_total", labels) == before + 1
    assert REGISTRY.get_sample_value("tidegate_breaker_state", {"dependency": "ev-e"}) == 2
    assert REGISTRY.get_sample_value("tidegate_retries_total", {"dependency": "ev-e"}) >= 1
    assert "breaker ev-e: closed -> open" in caplog.text
