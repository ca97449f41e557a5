"""The adaptive concurrency limit's rule and its priority queue, on a driven clock."""

from __future__ import annotations

import asyncio
import threading

import pytest

from resilience.adaptive import FAILURE, IGNORE, AdaptiveLimitConfig, AdaptiveLimiter, outcome
from resilience.clock import FakeClock
from resilience.errors import (
    AttemptTimeout,
    ConcurrencyLimited,
    ConfigError,
    PermanentError,
    TransientError,
)
from resilience.events import ConcurrencyLimit, EventBus, Rejected
from resilience.policy import Policy, PolicyConfig
from resilience.shedding import Priority


def limiter(**kw) -> tuple[AdaptiveLimiter, FakeClock, list]:
    clock, bus, seen = FakeClock(), EventBus(), []
    bus.subscribe(seen.append)
    cfg = AdaptiveLimitConfig(**{"min": 2, "max": 50, "initial": 10, **kw})
    return AdaptiveLimiter("dep", cfg, clock=clock, events=bus), clock, seen


def drive(lim: AdaptiveLimiter, clock: FakeClock, latency: float, rounds: int,
          result: str = "success") -> None:
    """Keep the limiter full (as a loaded worker does): each round fills every slot and
    completes them all after ``latency``."""
    for _ in range(rounds):
        n = lim.limit
        for _ in range(n):
            lim.acquire()
        clock.advance(latency)
        for _ in range(n):
            lim.release(latency, result)


def test_limit_grows_while_latency_holds_and_stops_at_max():
    lim, clock, _ = limiter()
    drive(lim, clock, 0.05, 60)
    assert lim.limit == 50


def test_limit_falls_when_latency_rises_and_rises_back_when_it_recovers():
    lim, clock, _ = limiter(max=40, initial=30)
    drive(lim, clock, 0.05, 30)
    healthy = lim.limit
    drive(lim, clock, 0.20, 30)  # four times slower: the gradient is at its floor
    slow = lim.limit
    assert slow < healthy / 2
    assert slow >= 2
    drive(lim, clock, 0.05, 40)
    assert lim.limit > 2 * slow


def test_never_below_min_and_failures_cut_it():
    lim, clock, _ = limiter(min=3)
    drive(lim, clock, 0.05, 1, result=FAILURE)
    assert lim.limit < 10
    drive(lim, clock, 0.05, 50, result=FAILURE)
    assert lim.limit == 3


def test_a_burst_of_failures_within_one_round_trip_cuts_once():
    """The failures of one overload episode are one signal: cut once per round trip (the
    latency average), as TCP cuts its window once per loss event."""
    lim, clock, _ = limiter(max=40, initial=30)
    drive(lim, clock, 0.05, 1)  # a round trip of ~50 ms is known
    before = lim._limit
    for _ in range(10):  # ten 503s within 20 ms
        lim.acquire()
        clock.advance(0.002)
        lim.release(0.002, FAILURE)
    assert lim._limit == pytest.approx(before * 0.9)  # not 0.9 ** 10
    clock.advance(0.05)  # the next round trip: a new episode, a new cut
    lim.acquire()
    lim.release(0.05, FAILURE)
    assert lim._limit == pytest.approx(before * 0.81)


def test_an_idle_limit_does_not_grow():
    lim, clock, _ = limiter()
    for _ in range(500):  # one call at a time: far below half the limit
        lim.acquire()
        clock.advance(0.01)
        lim.release(0.01)
    assert lim.limit == 10


def test_baseline_forgets_after_its_window_so_a_slower_dependency_becomes_normal():
    lim, clock, _ = limiter(baseline_window=5.0, max=40, initial=20)
    drive(lim, clock, 0.01, 20)
    assert lim.baseline == pytest.approx(0.01)
    drive(lim, clock, 0.1, 200)  # 20 s at ten times the latency
    assert lim.baseline > 0.05
    assert lim.limit > 2


def test_outcome_classes():
    assert outcome(None) == "success"
    assert outcome(AttemptTimeout("slow")) == FAILURE
    assert outcome(TransientError("503")) == FAILURE
    assert outcome(ConnectionError("reset")) == FAILURE
    assert outcome(PermanentError("400")) == IGNORE
    assert outcome(ConcurrencyLimited("full")) == IGNORE
    assert outcome(KeyboardInterrupt()) == IGNORE


def test_full_without_wait_refuses_with_an_event():
    lim, _, seen = limiter(min=1, initial=1)
    lim.acquire()
    with pytest.raises(ConcurrencyLimited, match="concurrency limit 1"):
        lim.acquire(Priority.CRITICAL)
    assert Rejected("dep", "concurrency_limit") in seen


def _waiter(lim: AdaptiveLimiter, prio: Priority, order: list, errors: list) -> threading.Thread:
    def run() -> None:
        try:
            lim.acquire(prio, max_wait=30)
            order.append(prio)
        except ConcurrencyLimited:
            errors.append(prio)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until(cond) -> None:
    for _ in range(3000):
        if cond():
            return
        threading.Event().wait(0.005)
    raise AssertionError("condition not reached in 15 s")


def test_waiters_are_admitted_by_priority_and_low_is_shed_first():
    lim, _, _ = limiter(min=1, initial=1, max_waiters=3)
    lim.acquire()
    order: list = []
    errors: list = []
    threads = []
    for n, prio in enumerate((Priority.LOW, Priority.MEDIUM, Priority.HIGH), 1):
        threads.append(_waiter(lim, prio, order, errors))
        _until(lambda n=n: lim.waiting == n)
    # the queue is full: a CRITICAL caller displaces the LOW one
    threads.append(_waiter(lim, Priority.CRITICAL, order, errors))
    _until(lambda: errors == [Priority.LOW])
    assert lim.waiting == 3
    # a LOW newcomer to a full queue of more important callers is refused at once
    with pytest.raises(ConcurrencyLimited):
        lim.acquire(Priority.LOW, max_wait=30)
    for expected in (1, 2, 3):
        lim.release(0.01, IGNORE)
        _until(lambda e=expected: len(order) == e)
    assert order == [Priority.CRITICAL, Priority.HIGH, Priority.MEDIUM]
    for t in threads:
        t.join(5)


def test_a_wait_that_runs_out_leaves_the_queue():
    lim, _, _ = limiter(min=1, initial=1)
    lim.acquire()
    with pytest.raises(ConcurrencyLimited):
        lim.acquire(Priority.HIGH, max_wait=0.01)
    assert lim.waiting == 0
    lim.release(0.01, IGNORE)
    lim.acquire()  # the slot was not handed to the departed waiter
    assert lim.in_flight == 1


def test_async_waiter_gets_the_slot_released_from_another_thread():
    lim, _, _ = limiter(min=1, initial=1)
    lim.acquire()

    async def main() -> int:
        task = asyncio.ensure_future(lim.aacquire(Priority.HIGH, max_wait=30))
        while lim.waiting == 0:
            await asyncio.sleep(0.001)
        threading.Thread(target=lim.release, args=(0.01, IGNORE)).start()
        await task
        return lim.in_flight

    assert asyncio.run(main()) == 1


def test_limit_reports_are_events():
    lim, clock, seen = limiter()
    drive(lim, clock, 0.05, 5)
    reports = [e for e in seen if isinstance(e, ConcurrencyLimit)]
    assert reports and reports[-1].limit == lim.limit
    assert reports[-1].baseline == pytest.approx(0.05)


@pytest.mark.parametrize("kw, message", [
    ({"min": 0}, "min must be an integer >= 1"),
    ({"min": 5, "initial": 2}, "min <= initial <= max"),
    ({"max_wait": -1}, "max_wait"),
])
def test_bad_config_is_one_clear_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        AdaptiveLimitConfig(**kw)


def test_policy_file_table_builds_the_layer_in_place_of_the_bulkhead():
    cfg = PolicyConfig.from_mapping("search", {
        "bulkhead": {"mode": "adaptive", "min": 2, "max": 60, "initial": 8, "max_wait_ms": 50}})
    assert cfg.adaptive_limit == AdaptiveLimitConfig(min=2, max=60, initial=8, max_wait=0.05)
    chain = repr(Policy(cfg).chain)
    assert "AdaptiveLimitLayer" in chain and "BulkheadLayer" not in chain
    assert "AdaptiveLimitLayer" not in repr(Policy(PolicyConfig(name="s")).chain)


@pytest.mark.parametrize("table, message", [
    ({"min": 2}, 'min need mode = "adaptive"'),
    ({"mode": "elastic"}, "mode must be one of static, adaptive"),
    ({"mode": "adaptive", "min": 9, "max": 4}, "min <= initial <= max"),
])
def test_policy_file_table_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        PolicyConfig.from_mapping("search", {"bulkhead": table})


def test_through_the_policy_a_failing_dependency_lowers_the_limit():
    clock = FakeClock()
    cfg = PolicyConfig.from_mapping("search", {
        "bulkhead": {"mode": "adaptive", "min": 2, "max": 60, "initial": 20}})
    p = Policy(cfg, clock=clock, events=EventBus(), layers=("adaptive_limit",))

    def boom() -> None:
        raise TransientError("503")

    for _ in range(30):
        with pytest.raises(TransientError):
            p.call(boom)
    assert p.adaptive_limiter.limit == 2
    assert p.adaptive_limiter.in_flight == 0


def test_a_layers_list_that_leaves_out_the_configured_limit_is_refused():
    with pytest.raises(ConfigError, match="leaves out 'adaptive_limit'"):
        PolicyConfig.from_mapping("search", {
            "layers": ["deadline", "bulkhead", "timeout"],
            "bulkhead": {"mode": "adaptive", "min": 2, "max": 60, "initial": 8}})
    with pytest.raises(ConfigError, match="leaves out 'hedge'"):
        PolicyConfig.from_mapping("search", {
            "idempotent": True, "layers": ["deadline", "timeout"], "hedge": {"delay_ms": 20}})
