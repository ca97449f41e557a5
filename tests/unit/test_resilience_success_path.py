"""The chain's success path: batched counting decides as unbatched counting does.

There is one execution path. What keeps it cheap is the breaker layer counting a success
locally while the breaker is plainly CLOSED (merged into the store later); a breaker with
``sync_interval = 0`` merges every outcome at once. The same script run through both must
give the same results, the same breaker transitions and the same counts.
"""

from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from resilience.breaker import BreakerConfig, BreakerState
from resilience.bulkhead import BulkheadConfig
from resilience.clock import FakeClock
from resilience.errors import AttemptTimeout, BulkheadFull, CircuitOpen, TransientError
from resilience.policy import Policy, PolicyConfig
from resilience.retry import RetryBudget, RetryConfig


def _policy(name: str, *, fast: bool, **breaker) -> tuple[Policy, FakeClock]:
    clock = FakeClock()
    bcfg = BreakerConfig(minimum_calls=10, failure_rate=0.5, window=10.0,
                         sync_interval=0.25 if fast else 0.0, **breaker)
    cfg = PolicyConfig(name=name, timeout=0.08, deadline=0.2, idempotent=False, breaker=bcfg)
    return Policy(cfg, clock=clock), clock


def _run(policy: Policy, clock: FakeClock, script: str) -> list[str]:
    """o = success, x = failure, l = late result, s = slow success (when configured)."""
    out = []

    def step(kind: str) -> str:
        if kind == "x":
            raise TransientError("down")
        clock.advance({"o": 0.001, "l": 0.09, "s": 0.05}[kind])
        return kind

    for kind in script:
        try:
            out.append(policy.call(step, kind))
        except (TransientError, AttemptTimeout, CircuitOpen) as exc:
            out.append(type(exc).__name__)
        clock.advance(0.01)
    return out


@pytest.mark.parametrize("script", [
    "oooooo" + "xxxxxx" + "oo",  # opens exactly at 6 of 12 (50%), then refuses
    "oo" + "xxx" + "ooo",  # 3 failures in 8 calls: closed, below minimum_calls (10)
    "ooooooooo" + "x" + "llllll" + "o",  # late results are failures too
    "o" * 30 + "x" * 29 + "o",  # the window holds all of it: 29/59 stays closed, 30/60 opens
])
def test_batched_and_unbatched_counting_make_the_same_decisions(script):
    fast, fclock = _policy(f"fast-{len(script)}", fast=True)
    full, rclock = _policy(f"full-{len(script)}", fast=False)
    merges = []
    merge = fast.store.breaker_sync
    fast.store.breaker_sync = lambda *a: (merges.append(1), merge(*a))[1]
    assert _run(fast, fclock, script) == _run(full, rclock, script)
    assert fast.breaker.state is full.breaker.state
    # successes really were batched (not after a failure: the window is dirty then)
    assert len(merges) < len(script)


def test_slow_successes_open_the_breaker_batched_or_not():
    results = []
    for fast in (True, False):
        p, clock = _policy(f"slow-{fast}", fast=fast, slow_call_duration=0.04,
                           slow_call_rate=0.5)
        results.append((_run(p, clock, "o" * 5 + "s" * 5 + "o"), p.breaker.state))
    assert results[0] == results[1]
    assert results[0][1] is BreakerState.OPEN


def test_a_scrape_sees_every_success_at_once():
    p, _ = _policy("scraped", fast=True)
    labels = {"dependency": "scraped", "outcome": "success"}
    before = REGISTRY.get_sample_value("tidegate_calls_total", labels) or 0
    count = {"dependency": "scraped"}
    hist_before = REGISTRY.get_sample_value("tidegate_call_duration_seconds_count", count) or 0
    for i in range(25):
        assert p.call(lambda x: x, i) == i
    assert REGISTRY.get_sample_value("tidegate_calls_total", labels) - before == 25
    assert REGISTRY.get_sample_value("tidegate_call_duration_seconds_count", count) \
        - hist_before == 25
    assert p.latency.p99() is not None  # the latency window folds first too


def test_the_retry_budget_counts_fast_successes_before_a_retry():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10.0, name="budgeted", clock=clock)
    cfg = PolicyConfig(name="budgeted", timeout=0.08, deadline=5.0, idempotent=True,
                       retry=RetryConfig(max_attempts=2, base=0.01))
    p = Policy(cfg, clock=clock, retry_budget=budget)
    for i in range(10):
        p.call(lambda x: x, i)
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise TransientError("once")
        return "second"

    # 11 requests x 20% = 2.2: one retry is affordable only if the 10 successes were counted
    assert p.call(flaky) == "second"
    assert len(attempts) == 2


def test_a_full_bulkhead_still_rejects_and_frees_every_slot():
    clock = FakeClock()
    cfg = PolicyConfig(name="crowded", timeout=0.08, deadline=0.2,
                       bulkhead=BulkheadConfig(max_concurrent=1))
    p = Policy(cfg, clock=clock)
    p.call(lambda: None)  # first call takes the full path (state unknown); now the fast one

    def inner():
        with pytest.raises(BulkheadFull):
            p.call(lambda: None)
        return "outer"

    assert p.call(inner) == "outer"
    assert p.bulkhead.in_use == 0
    with pytest.raises(KeyboardInterrupt):  # not an Exception: surfaces, slot still freed
        p.call(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert p.bulkhead.in_use == 0


def test_an_enclosing_deadline_bounds_the_fast_attempt():
    from resilience import deadline as dl

    clock = FakeClock()
    p = Policy(replace(PolicyConfig(name="nested"), timeout=0.08, deadline=0.2), clock=clock)
    p.call(lambda: None)
    with dl.deadline_scope(0.03, clock=clock):
        assert p.call(lambda: dl.client_timeout(1.0)) == pytest.approx(0.03)
        clock.advance(0.03)
        with pytest.raises(dl.DeadlineExceeded):
            p.call(lambda: "never runs")
    assert dl.current() is None and p.bulkhead.in_use == 0
