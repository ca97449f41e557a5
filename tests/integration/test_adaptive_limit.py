"""The adaptive concurrency limit against the real simulator: when the dependency's capacity
drops (its latency rises and overload errors appear) the limit falls; when it recovers, the
limit rises back. Load comes from threads calling through the chain over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from resilience.policy import Policy, PolicyConfig
from tidegate.stack import Sim, wait_until

pytestmark = pytest.mark.integration

THREADS = 24


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim("adaptive", tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_limit_falls_when_the_dependency_slows_and_rises_back(sim: Sim) -> None:
    sim.control(latency_ms=100)
    config = PolicyConfig.from_mapping("adaptive_sim", {
        "timeout_ms": 5000, "deadline_ms": 10000,
        "bulkhead": {"mode": "adaptive", "min": 2, "max": THREADS, "initial": 8,
                     "max_wait_ms": 1000},
    })
    policy = Policy(config, layers=("deadline", "adaptive_limit", "timeout"))
    limiter = policy.adaptive_limiter
    http = httpx.Client(base_url=sim.url, timeout=10,
                        limits=httpx.Limits(max_connections=THREADS + 4))
    stop = threading.Event()
    peak_in_flight = [0]

    def get_price() -> dict:
        peak_in_flight[0] = max(peak_in_flight[0], limiter.in_flight)
        response = http.get("/price")
        response.raise_for_status()
        return response.json()

    def load() -> None:
        while not stop.is_set():
            try:
                policy.call(get_price)
            except Exception:  # overload errors and refusals are the point
                continue

    threads = [threading.Thread(target=load, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: limiter.limit >= 16, 90, message="limit grows while healthy")
        healthy = limiter.limit
        sim.control(latency_ms=100, capacity=4)  # a quarter of the load it gets
        wait_until(lambda: limiter.limit <= 8, 90,
                   message=f"limit falls under overload (now {limiter.limit})")
        assert limiter.limit >= 2
        sim.control(latency_ms=100)  # capacity back
        wait_until(lambda: limiter.limit >= 16, 90,
                   message=f"limit rises back (now {limiter.limit})")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        http.close()
    assert healthy >= 16
    assert peak_in_flight[0] <= THREADS  # never above max
    # the limiter's state reached the metrics through its events
    gauge = REGISTRY.get_sample_value("tidegate_concurrency_limit",
                                      {"dependency": "adaptive_sim"})
    assert gauge is not None and 2 <= gauge <= THREADS
    assert REGISTRY.get_sample_value("tidegate_latency_baseline_seconds",
                                     {"dependency": "adaptive_sim"}) > 0.05
    assert sim.ledger()["peak_in_flight"] <= THREADS


def test_capacity_and_heavy_tail_switch_at_runtime(sim: Sim) -> None:
    """The simulator's capacity model and heavy tail, switched through /control."""
    sim.control(latency_ms=200, capacity=2, overload_error_rate=1.0)
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        results: list[int] = []

        def one() -> None:
            results.append(http.get("/price").status_code)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert 503 in results  # above capacity: overload errors appear
        assert sim.ledger()["peak_in_flight"] > 2
        sim.control(latency_ms=10, tail_rate=1.0, tail_factor=20)  # every request in the tail
        response = http.get("/price")
        assert response.status_code == 200
        assert response.elapsed.total_seconds() >= 0.2
        assert http.get("/control").json()["tail_factor"] == 20


def test_hedged_reads_against_a_heavy_tail(sim: Sim) -> None:
    """A fifth of the requests are 20x slower: hedges start after 30 ms, some win, and the
    simulator saw the extra requests; every call got its answer."""
    sim.control(latency_ms=10, tail_rate=0.2, tail_factor=20)
    config = PolicyConfig.from_mapping("hedge_sim", {
        "idempotent": True, "timeout_ms": 2000, "deadline_ms": 4000,
        "hedge": {"delay_ms": 30, "max": 2},
    })
    policy = Policy(config)
    before = REGISTRY.get_sample_value("tidegate_hedges_total",
                                       {"dependency": "hedge_sim", "result": "won"}) or 0
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        def get_price() -> dict:
            response = http.get("/price")
            response.raise_for_status()
            return response.json()

        answers = [policy.call(get_price) for _ in range(40)]
    assert all(a["price_cents"] == 1999 for a in answers)
    won = REGISTRY.get_sample_value("tidegate_hedges_total",
                                    {"dependency": "hedge_sim", "result": "won"}) - before
    assert won >= 1
    assert sim.ledger()["requests"] > 40


def test_hedge_delay_p95_learns_the_tail_of_the_real_simulator(sim: Sim) -> None:
    """delay = "p95" against 10 ms answers with 4% of them 20x slower: it starts at half the
    attempt timeout (no hedge), then follows the observed p95 (a fast answer; the floor,
    20 ms, holds), after which the slow first attempts are hedged and the hedges win."""
    sim.control(latency_ms=10, tail_rate=0.04, tail_factor=20)
    config = PolicyConfig.from_mapping("hedge_p95_sim", {
        "idempotent": True, "timeout_ms": 2000, "deadline_ms": 4000,
        "hedge": {"delay": "p95", "max": 1, "floor_ms": 20},
    })
    policy = Policy(config)
    assert policy.hedge_delay is not None and policy.hedge_delay.seconds == 1.0
    labels = {"dependency": "hedge_p95_sim", "result": "won"}
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        def get_price() -> dict:
            response = http.get("/price")
            response.raise_for_status()
            return response.json()

        for _ in range(30):  # 20 samples in, then the first refresh
            policy.call(get_price)
        # below the 200 ms tail once the window holds enough (a few dozen samples can hold
        # more than 5% slow ones), never below the floor; 30 s: on a loaded machine the fast
        # answers slow down too, and fewer samples come in (timed out once at 10 s)
        wait_until(lambda: (policy.call(get_price), policy.hedge_delay.seconds < 0.2)[1],
                   timeout=30, message="the hedge delay following the p95")
        assert policy.hedge_delay.seconds >= 0.02
        before = REGISTRY.get_sample_value("tidegate_hedges_total", labels) or 0
        for _ in range(150):  # ~6 slow first attempts expected; none in 150: p = 0.2%
            policy.call(get_price)
    assert REGISTRY.get_sample_value("tidegate_hedge_delay_seconds",
                                     {"dependency": "hedge_p95_sim"}) == \
        pytest.approx(policy.hedge_delay.seconds)
    assert (REGISTRY.get_sample_value("tidegate_hedges_total", labels) or 0) - before >= 1
