"""Desired workers per queue: the formula, clamping, and scale-down stabilisation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilience.clock import FakeClock
from resilience.errors import ConfigError
from workers.autoscale import (
    Autoscaler,
    ScalingPolicy,
    Stabiliser,
    desired_workers,
    load_scaling_policies,
    target_backlog_per_worker,
)


def test_target_is_acceptable_wait_times_throughput():
    # AWS's worked example: 0.1 s per message, 10 s acceptable latency -> 100 per instance.
    policy = ScalingPolicy(acceptable_wait_s=10, worker_concurrency=1, default_processing_s=5)
    assert target_backlog_per_worker(policy, 0.1) == 100
    # Concurrency multiplies what one worker drains in the acceptable wait.
    assert target_backlog_per_worker(replace_conc(policy, 4), 0.1) == 400
    # Without an observation the configured default stands in: 10 s / 5 s = 2.
    assert target_backlog_per_worker(policy, None) == 2
    # Never below one message per worker, however slow the task.
    assert target_backlog_per_worker(policy, 60.0) == 1


def replace_conc(policy: ScalingPolicy, c: int) -> ScalingPolicy:
    from dataclasses import replace

    return replace(policy, worker_concurrency=c)


def test_desired_is_ceil_of_backlog_over_target_like_keda_average_value():
    policy = ScalingPolicy(min_workers=0, max_workers=100)
    assert desired_workers(0, 100, policy) == 0
    assert desired_workers(1, 100, policy) == 1
    assert desired_workers(100, 100, policy) == 1
    assert desired_workers(101, 100, policy) == 2
    assert desired_workers(1500, 100, policy) == 15


def test_clamped_to_min_and_max():
    policy = ScalingPolicy(min_workers=2, max_workers=5)
    assert desired_workers(0, 10, policy) == 2
    assert desired_workers(30, 10, policy) == 3
    assert desired_workers(10_000, 10, policy) == 5


@given(backlog=st.integers(0, 10**7), target=st.integers(1, 10**5),
       lo=st.integers(0, 50), span=st.integers(0, 50))
def test_desired_property(backlog, target, lo, span):
    policy = ScalingPolicy(min_workers=lo, max_workers=max(1, lo + span))
    n = desired_workers(backlog, target, policy)
    assert policy.min_workers <= n <= policy.max_workers
    if policy.min_workers < n < policy.max_workers:
        # Exactly enough workers: n meet the target, n - 1 would not.
        assert n * target >= backlog > (n - 1) * target
    assert n == min(policy.max_workers, max(policy.min_workers, math.ceil(backlog / target)))


def test_stabilisation_holds_the_highest_recommendation_of_the_window():
    clock = FakeClock()
    stab = Stabiliser(window_s=300, clock=clock)
    assert stab(2) == 2
    assert stab(8) == 8  # up: at once
    clock.advance(10)
    assert stab(1) == 8  # a dip inside the window does not scale down
    clock.advance(280)
    assert stab(3) == 8  # the 8 was 290 s ago: still inside
    clock.advance(11)
    assert stab(3) == 3  # the 8 left the window (301 s ago); the 1 too
    clock.advance(1)
    assert stab(9) == 9


def test_autoscaler_stabilises_per_queue_and_reports_its_inputs():
    clock = FakeClock()
    policies = {"payments": ScalingPolicy(acceptable_wait_s=10, worker_concurrency=2,
                                          min_workers=1, max_workers=10, scale_down_window_s=60)}
    scaler = Autoscaler(policies, ScalingPolicy(min_workers=0, scale_down_window_s=0),
                        clock=clock)
    d = scaler.decide("payments", backlog=150, processing_s=0.5)
    # 2 / 0.5 s = 4 tasks/s per worker, 10 s -> 40 per worker; ceil(150 / 40) = 4.
    assert (d.target_per_worker, d.recommended, d.desired, d.observed) == (40, 4, 4, True)
    clock.advance(30)
    d = scaler.decide("payments", backlog=0, processing_s=0.5)
    assert (d.recommended, d.desired) == (1, 4)  # held by the 60 s window
    clock.advance(31)
    assert scaler.decide("payments", backlog=0).desired == 1
    # Another queue has its own policy and window: zero window, scale to zero.
    # Default policy: 4 / 1 s x 30 s = 120 per worker; ceil(500 / 120) = 5.
    assert scaler.decide("search", backlog=500).desired == 5
    clock.advance(1)
    assert scaler.decide("search", backlog=0).desired == 0
    d = scaler.decide("email", backlog=3)
    assert (d.observed, d.processing_s) == (False, 1.0)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"acceptable_wait_s": 0}, "acceptable_wait_s"),
    ({"default_processing_s": -1}, "default_processing_s"),
    ({"worker_concurrency": 0}, "worker_concurrency"),
    ({"min_workers": 5, "max_workers": 2}, "min_workers"),
    ({"max_workers": 1.5}, "max_workers"),
    ({"scale_down_window_s": float("nan")}, "scale_down_window_s"),
])
def test_bad_policy_names_the_field(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        ScalingPolicy(**kw)


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="backlog"):
        desired_workers(-1, 10, ScalingPolicy())
    with pytest.raises(ConfigError, match="target"):
        desired_workers(1, 0, ScalingPolicy())


def test_policies_from_the_policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(
        "[dependencies.payments]\nurl = 'http://127.0.0.1:1'\n"
        "[autoscaling]\nacceptable_wait_s = 20\nmax_workers = 8\n"
        "[autoscaling.payments]\nmin_workers = 2\n"
    )
    default, per_queue = load_scaling_policies(path)
    assert (default.acceptable_wait_s, default.max_workers, default.min_workers) == (20, 8, 1)
    assert per_queue["payments"] == ScalingPolicy(acceptable_wait_s=20, max_workers=8,
                                                  min_workers=2)
    deps = "[dependencies.search]\nurl = 'http://127.0.0.1:1'\n"
    path.write_text(deps + "[autoscaling.search]\nmax_workes = 3\n")
    with pytest.raises(ConfigError, match=r"autoscaling\.search\.max_workes\]: unknown key; "
                                          r"did you mean 'max_workers'"):
        load_scaling_policies(path)
    path.write_text(deps + "[autoscaling.serch]\nmax_workers = 3\n")
    with pytest.raises(ConfigError, match=r"autoscaling\.serch\]: unknown queue; "
                                          r"did you mean 'search'"):
        load_scaling_policies(path)
    path.write_text(deps + "[autoscaling]\nmin_workers = -1\n")
    with pytest.raises(ConfigError, match="min_workers"):
        load_scaling_policies(path)
    # The shipped policy file parses (its [autoscaling] tables are optional).
    from workers.settings import DEFAULT_POLICY_FILE

    default, per_queue = load_scaling_policies(DEFAULT_POLICY_FILE)
    assert isinstance(default, ScalingPolicy)
    assert all(isinstance(p, ScalingPolicy) for p in per_queue.values())
