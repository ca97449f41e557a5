"""P99 x 2, live: workers publish each dependency's observed P99; the exporter, ``tidegate
depth`` and ``tidegate policy check --live`` show it next to the configured timeout."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import tidegate_env
from tests.support.exporter import Exporter, sample
from tests.support.procs import BIN, ROOT, wait_until
from workers.latency_share import CONCURRENCY_KEY, HASH_KEY, read_concurrency, read_latency, verdict

pytestmark = pytest.mark.integration


def _run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tidegate"), *argv], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_verdict_follows_the_seeds_bounds():
    assert verdict(0.08, 0.04) is None and verdict(0.16, 0.04) is None
    assert "below P99 x 2" in verdict(0.079, 0.04)
    assert "above 4 x P99" in verdict(0.161, 0.04)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_observed_p99_and_suggested_timeout_reach_metrics_depth_and_check(
        broker, sims, policy_file, producer, start_worker, state_redis, tmp_path):
    state_redis.delete(HASH_KEY)
    # every search answer takes >= 100 ms: P99 x 2 >= 200 ms, above the 160 ms timeout
    sims["search"].control(latency_ms=100)
    start_worker("search")
    for i in range(5):
        producer.enqueue("search.index", [f"doc-{i}"])
    wait_until(lambda: sims["search"].ledger()["applied"] >= 5, 60, message="5 documents")
    observed = wait_until(lambda: read_latency(state_redis).get("search"), 30, interval=0.5,
                          message="the worker's latency window published")
    assert observed.p99_s >= 0.1 and observed.samples >= 5

    env = tidegate_env(broker, policy_file)
    exporter = Exporter(env, tmp_path)
    try:
        s = exporter.samples()
        p99 = sample(s, "tidegate_dependency_latency_p99_seconds", dependency="search")
        suggested = sample(s, "tidegate_dependency_suggested_timeout_seconds",
                           dependency="search")
        assert p99 is not None and p99 >= 0.1
        assert suggested == pytest.approx(2 * p99, rel=1e-3)
        assert sample(s, "tidegate_dependency_timeout_seconds", dependency="search") == 0.16
    finally:
        exporter.stop()

    out = _run(env, "depth", "--json")
    assert out.returncode == 0, out.stderr
    [search] = [v for v in json.loads(out.stdout)["latency"] if v["dependency"] == "search"]
    assert search["p99_s"] >= 0.1 and "below P99 x 2" in search["warning"]

    out = _run(env, "policy", "check", str(policy_file), "--live")
    assert out.returncode == 0, out.stderr
    assert "search" in out.stdout and "P99 x 2" in out.stdout
    assert "warning: dependencies.search.timeout_ms: timeout 160 ms is below P99 x 2" \
        in out.stderr


def test_a_p99x2_timeout_follows_the_shared_window(state_redis):
    from resilience.clock import FakeClock
    from resilience.policy import Policy
    from resilience.policy_config import PolicyConfig
    from workers.latency_share import LatencyMirror

    state_redis.delete(HASH_KEY)
    clock = FakeClock()
    cfg = PolicyConfig.from_mapping("adaptive", {"idempotent": True, "timeout_ms": "p99x2",
                                                 "deadline_ms": 400,
                                                 "timeout": {"floor_ms": 20}})
    policy = Policy(cfg, clock=clock)
    assert policy.timeout.seconds == 0.2  # the ceiling, until there is data

    def answer():
        clock.advance(0.03)  # every attempt takes 30 ms
        return "ok"

    for _ in range(50):
        policy.call(answer)
    mirror = LatencyMirror(state_redis, lambda: {"adaptive": policy})
    assert mirror.flush() == 1  # published to the real Redis, read back, applied
    assert policy.timeout.seconds == pytest.approx(0.06, rel=0.05)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_adaptive_limit_reaches_metrics_and_depth(
        broker, sims, policy_file, producer, start_worker, state_redis, tmp_path):
    """A real worker on search with ``bulkhead.mode = "adaptive"``: its limit, in-flight count
    and baseline are published, summed cluster-wide, and shown by the exporter and depth."""
    from tests.support.exporter import with_adaptive_search

    state_redis.delete(CONCURRENCY_KEY)
    adaptive = with_adaptive_search(policy_file, tmp_path)
    env = tidegate_env(broker, adaptive)
    sims["search"].control(latency_ms=30)
    start_worker("search", env={"TIDEGATE_POLICY_FILE": str(adaptive)})
    for i in range(8):
        producer.enqueue("search.index", [f"doc-{i}"])
    wait_until(lambda: sims["search"].ledger()["applied"] >= 8, 60, message="8 documents")
    seen = wait_until(lambda: (lambda c: c if c and c.baseline_s else None)(
        read_concurrency(state_redis).get("search")), 30, interval=0.5,
        message="the worker's adaptive limit published")
    assert 2 <= seen.limit <= 20 * seen.processes and seen.in_flight >= 0
    assert seen.baseline_s >= 0.03  # every answer takes >= 30 ms

    exporter = Exporter(env, tmp_path)
    try:
        s = exporter.samples()
        limit = sample(s, "tidegate_dependency_concurrency_limit", dependency="search")
        baseline = sample(s, "tidegate_dependency_latency_baseline_seconds",
                          dependency="search")
        assert limit is not None and limit >= 2
        assert baseline is not None and baseline >= 0.03
        assert sample(s, "tidegate_dependency_concurrency_in_flight",
                      dependency="search") is not None
        # payments keeps its static bulkhead: no adaptive series
        assert sample(s, "tidegate_dependency_concurrency_limit",
                      dependency="payments") is None
    finally:
        exporter.stop()

    out = _run(env, "depth", "--json")
    assert out.returncode == 0, out.stderr
    [search] = json.loads(out.stdout)["concurrency"]
    assert search["dependency"] == "search" and (search["min"], search["max"]) == (2, 20)
    assert search["limit"] >= 2 and search["baseline_s"] >= 0.03
    out = _run(env, "depth")
    assert out.returncode == 0, out.stderr
    assert "adaptive limits" in out.stdout and "2..20" in out.stdout


def test_adaptive_limits_sum_over_fresh_processes(state_redis):
    import time

    from resilience.policy import Policy
    from resilience.policy_config import PolicyConfig
    from workers.latency_share import publish_concurrency

    state_redis.delete(CONCURRENCY_KEY)
    cfg = PolicyConfig.from_mapping("search", {
        "timeout_ms": 500, "deadline_ms": 1000,
        "bulkhead": {"mode": "adaptive", "min": 2, "max": 20, "initial": 6}})
    static = PolicyConfig.from_mapping("payments", {"timeout_ms": 100})
    a, b = Policy(cfg), Policy(cfg)
    a.call(lambda: time.sleep(0.01))  # a has a baseline, b none yet
    assert publish_concurrency(state_redis, {"search": a, "payments": Policy(static)},
                               "host:1") == 1
    publish_concurrency(state_redis, {"search": b}, "host:2")
    publish_concurrency(state_redis, {"search": b}, "host:3", now=lambda: time.time() - 120)
    seen = read_concurrency(state_redis)["search"]
    assert (seen.limit, seen.in_flight, seen.processes) == (12, 0, 2)  # host:3 is stale
    assert seen.baseline_s is not None and seen.baseline_s >= 0.01
    assert state_redis.hlen(CONCURRENCY_KEY) == 2  # the stale entry was dropped
