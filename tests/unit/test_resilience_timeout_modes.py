"""Timeout modes (cooperative inline vs abandon in the pool), the lean retry entry, bulkhead."""

import threading
import time

import pytest

from resilience import deadline as dl
from resilience.breaker import BreakerConfig
from resilience.bulkhead import Bulkhead, BulkheadConfig
from resilience.clock import FakeClock
from resilience.errors import (
    AttemptTimeout,
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    PermanentError,
    RetriesExhausted,
)
from resilience.policy import Policy, PolicyConfig
from resilience.retry import Retrier, RetryConfig
from resilience.timeout import DEFAULT_TIMEOUT_MODE, Timeout


def test_policy_default_mode_is_cooperative_and_table_key_selects_it():
    assert DEFAULT_TIMEOUT_MODE == "cooperative"
    assert PolicyConfig().timeout_mode == "cooperative"
    assert PolicyConfig.from_mapping("x", {}).timeout_mode == "cooperative"
    cfg = PolicyConfig.from_mapping("x", {"timeout_ms": 50, "timeout": {"mode": "abandon"}})
    assert (cfg.timeout, cfg.timeout_mode) == (0.05, "abandon")
    assert Policy(cfg).timeout.mode == "abandon"
    with pytest.raises(ConfigError, match=r"dependencies\.x\.timeout\.mode"):
        PolicyConfig.from_mapping("x", {"timeout": {"mode": "kill"}})
    with pytest.raises(ConfigError, match=r"dependencies\.x\.timeout\.ms"):
        PolicyConfig.from_mapping("x", {"timeout": {"ms": 10}})
    with pytest.raises(ConfigError, match="timeout mode"):
        PolicyConfig(timeout_mode="never")
    assert Timeout(0.1, Bulkhead("d")).mode == "abandon"  # the primitive keeps its behaviour


def test_cooperative_runs_inline_under_a_slot_with_the_attempt_budget():
    clock = FakeClock()
    bh = Bulkhead("d", BulkheadConfig(max_concurrent=1))
    t = Timeout(0.08, bh, clock, mode="cooperative")
    seen = {}

    def callee():
        seen["thread"] = threading.get_ident()
        seen["in_use"] = bh.in_use
        seen["budget"] = dl.client_timeout(1.0)
        with pytest.raises(BulkheadFull):  # the slot is really taken
            t.call(lambda: None)
        return "ok"

    assert t.call(callee) == "ok"
    assert seen == {"thread": threading.get_ident(), "in_use": 1, "budget": pytest.approx(0.08)}
    assert bh.in_use == 0 and dl.current() is None
    with dl.deadline_scope(0.05, clock=clock):  # a nearer deadline bounds the attempt
        assert t.call(lambda: dl.client_timeout(1.0)) == pytest.approx(0.05)
        clock.advance(0.05)
        with pytest.raises(dl.DeadlineExceeded):
            t.call(lambda: "never runs")
    assert bh.in_use == 0


def test_cooperative_late_result_is_a_timeout_and_the_breaker_counts_it():
    clock = FakeClock()
    p = Policy(
        PolicyConfig(
            name="slowpoke",
            timeout=0.08,
            deadline=0.2,
            breaker=BreakerConfig(minimum_calls=4, failure_rate=0.7),
        ),
        clock=clock,
    )
    calls = []

    def late(x):
        calls.append(x)
        clock.advance(0.09)  # answered, but after the attempt timeout
        return x

    # keyed: retryable, so a late result is the timeout it is; the second attempt fits in
    # the deadline (late too)
    with pytest.raises(RetriesExhausted) as info:
        p.call(late, 1, idempotency_key="k1")
    assert isinstance(info.value.__cause__, AttemptTimeout)
    assert calls == [1, 1]
    assert p.call(lambda x: x, 2) == 2  # on time: a success
    # not idempotent, no key: may not be retried, and its effect happened - the late result
    # comes back (not a false failure that hides a done charge), but it counts as a timeout
    assert p.call(late, 3) == 3
    with pytest.raises(CircuitOpen):  # 3 timeouts in 4 attempts: the breaker opened
        p.call(late, 4)
    assert calls == [1, 1, 3]
    assert p.bulkhead.in_use == 0


def test_cooperative_late_error_is_a_timeout_chained_to_the_error():
    clock = FakeClock()
    t = Timeout(0.08, Bulkhead("d"), clock, mode="cooperative")

    def late_error():
        clock.advance(0.1)
        raise PermanentError("answered too late")

    with pytest.raises(AttemptTimeout) as info:
        t.call(late_error)
    assert isinstance(info.value.__cause__, PermanentError)

    def quick_error():
        raise PermanentError("bad request")

    with pytest.raises(PermanentError):  # on time: the callee's own error, as it is
        t.call(quick_error)
    assert t.bulkhead.in_use == 0


def test_cooperative_late_result_is_retried_when_idempotent():
    clock = FakeClock()
    p = Policy(
        PolicyConfig(
            name="reads",
            idempotent=True,
            timeout=0.08,
            deadline=10.0,
            retry=RetryConfig(base=0.001),
        ),
        clock=clock,
    )
    n = {"calls": 0}

    def slow_once():
        n["calls"] += 1
        if n["calls"] == 1:
            clock.advance(0.1)
        return n["calls"]

    assert p.call(slow_once) == 2 and len(clock.sleeps) == 1


def test_abandon_mode_still_abandons_a_hanging_call():
    release = threading.Event()
    p = Policy(
        PolicyConfig(
            name="hangs",
            timeout=0.05,
            deadline=0.2,
            timeout_mode="abandon",
            bulkhead=BulkheadConfig(max_concurrent=1),
        )
    )
    where = {}

    def hang():
        where["thread"] = threading.get_ident()
        release.wait(5)

    started = time.monotonic()
    with pytest.raises(AttemptTimeout):
        p.call(hang)
    assert time.monotonic() - started < 2  # the caller got control back, the callee hangs on
    assert where["thread"] != threading.get_ident()
    assert p.bulkhead.in_use == 1  # abandoned work still holds its slot
    with pytest.raises(BulkheadFull):
        p.call(lambda: None)
    release.set()
    for _ in range(500):
        if p.bulkhead.in_use == 0:
            break
        time.sleep(0.01)
    assert p.call(lambda: 7) == 7
    p.bulkhead.shutdown()


def test_first_attempt_success_never_enters_tenacity_and_failures_replay_into_it():
    clock = FakeClock()
    r = Retrier(RetryConfig(base=0.001), clock=clock)
    real = r._sync

    def boom(*a, **k):
        raise AssertionError("tenacity entered on the success path")

    r._sync = boom
    assert r.call(lambda: 5) == 5
    r._sync = real
    n = {"calls": 0}

    def flaky():
        n["calls"] += 1
        if n["calls"] < 3:
            raise ConnectionError("blip")
        return n["calls"]

    assert r.call(flaky) == 3 and len(clock.sleeps) == 2  # attempt 1 counted, 2 waits
    with pytest.raises(PermanentError):  # not retryable: surfaces as it is, one call
        r.call(lambda: (_ for _ in ()).throw(PermanentError("no")))


def test_bulkhead_bounded_wait_gets_a_freed_slot():
    bh = Bulkhead("d", BulkheadConfig(max_concurrent=1, max_wait=2.0))
    bh.acquire()
    threading.Timer(0.05, bh.release).start()
    started = time.monotonic()
    bh.acquire()  # waits for the release above
    assert time.monotonic() - started < 1.5 and bh.in_use == 1
    with pytest.raises(BulkheadFull):
        bh.acquire(max_wait=0.01)
    bh.release()
    with pytest.raises(ValueError):
        bh.release()
