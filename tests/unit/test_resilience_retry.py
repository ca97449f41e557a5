"""Retry schedule, gating, deadline awareness and the retry budget, on a fake clock."""

import asyncio
import random

import pytest
import tenacity

from resilience import deadline as dl
from resilience.clock import FakeClock
from resilience.errors import (
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    NotIdempotent,
    PermanentError,
    RetriesExhausted,
    TransientError,
)
from resilience.retry import (
    InCallPause,
    Retrier,
    RetryBudget,
    RetryConfig,
    SeedBackoff,
    attempts_allowed,
    backoff_delay,
    is_retryable,
    retry_call,
)
from resilience.stores import MemoryStore


class Lo:
    @staticmethod
    def uniform(a, b):
        return a


class Hi:
    @staticmethod
    def uniform(a, b):
        return b


def test_seed_schedule_bounds():
    cfg = RetryConfig()
    assert backoff_delay(1, cfg) == 0.0
    assert [backoff_delay(n, cfg, Lo) for n in (2, 3, 4)] == [2.0, 4.0, 8.0]
    assert [backoff_delay(n, cfg, Hi) for n in (2, 3, 4)] == [3.0, 6.0, 12.0]
    rng = random.Random(7)
    for n, (lo, hi) in {2: (2, 3), 3: (4, 6), 4: (8, 12)}.items():
        for _ in range(200):
            assert lo <= backoff_delay(n, cfg, rng) <= hi
    assert backoff_delay(10, cfg, Hi) == 30.0  # capped
    assert backoff_delay(3, RetryConfig(base=0.001), Lo) == pytest.approx(0.004)


def test_seed_backoff_is_a_tenacity_wait():
    clock = FakeClock()
    calls = []

    def fail():
        calls.append(1)
        raise TransientError("x")

    r = tenacity.Retrying(
        wait=SeedBackoff(1.0, 30.0, Lo),
        stop=tenacity.stop_after_attempt(4),
        sleep=clock.sleep,
        reraise=True,
    )
    with pytest.raises(TransientError):
        r(fail)
    assert clock.sleeps == [2.0, 4.0, 8.0] and len(calls) == 4


@pytest.mark.parametrize(
    "kw",
    [{"max_attempts": 0}, {"base": 0}, {"max_wait": float("inf")}, {"retry_on": ("x",)}],
)
def test_retry_config_validated(kw):
    with pytest.raises(ConfigError):
        RetryConfig(**kw)


def _failing(n_failures, exc=TransientError):
    state = {"calls": 0}

    def fn():
        state["calls"] += 1
        if state["calls"] <= n_failures:
            raise exc("boom")
        return "ok"

    return fn, state


def test_retries_transient_then_succeeds_with_seed_waits():
    clock = FakeClock()
    fn, state = _failing(2)
    assert Retrier(RetryConfig(), clock=clock, rng=Lo).call(fn) == "ok"
    assert state["calls"] == 3 and clock.sleeps == [2.0, 4.0]


def test_exhausted_carries_last_exception_and_attempts():
    clock = FakeClock()
    fn, _state = _failing(99, ConnectionError)
    with pytest.raises(RetriesExhausted) as info:
        Retrier(RetryConfig(), clock=clock, rng=Hi).call(fn)
    assert info.value.attempts == 4 and isinstance(info.value.last_exception, ConnectionError)
    assert clock.sleeps == [3.0, 6.0, 12.0]


@pytest.mark.parametrize("exc", [PermanentError, CircuitOpen, ValueError])
def test_permanent_rejected_and_unknown_errors_surface_at_once(exc):
    fn, state = _failing(99, exc)
    with pytest.raises(exc):
        Retrier(RetryConfig(), clock=FakeClock()).call(fn)
    assert state["calls"] == 1


def test_non_idempotent_runs_once_and_explicit_retry_is_refused():
    fn, state = _failing(99)
    with pytest.raises(TransientError):
        Retrier(RetryConfig(), clock=FakeClock()).call(fn, retryable=False)
    assert state["calls"] == 1
    with pytest.raises(NotIdempotent):
        retry_call(fn, RetryConfig(), idempotent=False)
    assert state["calls"] == 1
    fn2, _state2 = _failing(1)
    assert (
        retry_call(fn2, RetryConfig(), idempotent=False, idempotency_key="k", clock=FakeClock())
        == "ok"
    )


def test_never_sleeps_past_the_deadline():
    clock = FakeClock()
    fn, state = _failing(99)
    with dl.deadline_scope(5.0, clock=clock), pytest.raises(DeadlineExceeded) as info:
        Retrier(RetryConfig(), clock=clock, rng=Lo).call(fn)
    # 2 s sleep fits in 5 s, the 4 s one would end past it: stop before, not after
    assert clock.sleeps == [2.0] and state["calls"] == 2
    assert isinstance(info.value.__cause__, TransientError)


def test_is_retryable():
    assert (
        is_retryable(TransientError()) and is_retryable(OSError()) and is_retryable(TimeoutError())
    )
    assert (
        not is_retryable(CircuitOpen())
        and not is_retryable(PermanentError())
        and not is_retryable(KeyError())
    )


def test_retry_budget_ratio_plus_floor():
    clock = FakeClock()
    budget = RetryBudget(
        ratio=0.2, min_per_second=1, window=10, store=MemoryStore(clock), clock=clock
    )
    assert budget.floor == 10
    for _ in range(100):
        budget.record_request()
    allowed = sum(budget.try_spend() for _ in range(100))
    assert allowed == 30  # 0.2 * 100 + 10
    clock.advance(11)  # window rolled over
    assert budget.try_spend()


def test_retrier_stops_when_budget_is_spent():
    clock = FakeClock()
    budget = RetryBudget(
        ratio=0.0, min_per_second=0.1, window=10, store=MemoryStore(clock), clock=clock
    )
    fn, state = _failing(99)
    with pytest.raises(RetriesExhausted, match="budget"):
        Retrier(RetryConfig(), clock=clock, budget=budget, rng=Lo).call(fn)
    assert state["calls"] == 2  # floor of 1 retry, then the budget says no


def test_async_retry_on_fake_clock():
    clock = FakeClock()
    state = {"calls": 0}

    async def fn():
        state["calls"] += 1
        if state["calls"] < 3:
            raise TransientError("x")
        return 42

    assert asyncio.run(Retrier(RetryConfig(base=0.5), clock=clock, rng=Lo).acall(fn)) == 42
    assert clock.sleeps == [1.0, 2.0]


def test_in_call_retry_fits_the_seed_budget_80ms_per_attempt_200ms_in_all():
    from resilience.policy import Policy, PolicyConfig

    clock = FakeClock()
    p = Policy(PolicyConfig(name="pricing", idempotent=True), clock=clock, rng=Hi)
    calls = []

    def slow_then_fast():
        calls.append(clock.now())
        if len(calls) == 1:
            clock.advance(0.08)  # the first attempt uses its whole 80 ms, then times out
            raise TimeoutError("read timed out")
        return "price"

    assert p.call(slow_then_fast) == "price"
    # attempt 2 after a pause of at most 20 ms, so 2 x 80 ms fit in 200 ms
    assert clock.sleeps == [pytest.approx(0.02)] and len(calls) == 2

    calls.clear()

    def always_slow():
        calls.append(1)
        clock.advance(0.08)
        raise TimeoutError("read timed out")

    with pytest.raises(RetriesExhausted):  # two in the call, as the seed's example
        p.call(always_slow)
    assert len(calls) == 2
    calls.clear()
    three = Policy(PolicyConfig(name="pricing", idempotent=True,
                                retry=RetryConfig(in_call_attempts=3)), clock=clock, rng=Hi)
    with pytest.raises(DeadlineExceeded):  # a third 80 ms attempt cannot fit: not started
        three.call(always_slow)
    assert len(calls) == 2


def test_in_call_pause_is_shortened_to_leave_the_next_attempt_its_timeout():
    clock = FakeClock()
    with dl.deadline_scope(0.2, clock=clock):
        clock.advance(0.11)
        wait = InCallPause(0.05, attempt_timeout=0.08, rng=Hi)
        assert wait(None) == pytest.approx(0.01)  # 90 ms left: 10 ms of pause, 80 of attempt
        clock.advance(0.02)
        assert wait(None) == 0.0  # never negative


def test_allowance_caps_a_call_and_counts_its_attempts():
    from resilience.policy import Policy, PolicyConfig

    clock = FakeClock()
    p = Policy(PolicyConfig(name="email", idempotent=True, timeout=0.5, deadline=2.0,
                            retry=RetryConfig(in_call_attempts=4)), clock=clock)
    fn, state = _failing(99)
    with attempts_allowed(4) as a, pytest.raises(RetriesExhausted):
        p.call(fn)
    assert state["calls"] == 4 and a.made == 4  # 4 x 500 ms fit in 2 s: all in the call
    fn, state = _failing(99)
    with attempts_allowed(2) as a, pytest.raises(RetriesExhausted, match="attempts are spent"):
        p.call(fn)
    assert state["calls"] == 2 and a.made == 2
    fn, state = _failing(99)
    with attempts_allowed(0) as a, pytest.raises(TransientError):
        Policy(PolicyConfig(name="payments"), clock=clock).call(fn, idempotency_key=None)
    assert state["calls"] == 1 and a.made == 1  # unkeyed, not idempotent: one attempt


def test_retry_config_in_call_scale_validated():
    for bad in (-0.01, float("inf")):
        with pytest.raises(ConfigError, match="pause"):
            RetryConfig(pause=bad)
    with pytest.raises(ConfigError, match="in_call_attempts"):
        RetryConfig(in_call_attempts=0)
    assert RetryConfig().per_call == 2 and RetryConfig(max_attempts=1).per_call == 1
