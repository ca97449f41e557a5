# ruff: noqa: F811  (pytest fixtures imported from _delivery are parameters here)
"""The seed's two retry scales on real simulators: a retry that fits the 200 ms budget, and a
job whose attempts add up across in-call retries and broker retries.

The shipped policy file (payments and pricing: 80 ms per attempt, 200 ms in all) is used as
is, pointed at the simulators. A simulator's first request stalls well past 80 ms, so the
first attempt times out; the ledger counts what reached it. Timing is asserted only as "the
answer came before the deadline fired" (a late answer is a timeout in the chain), never in
tight milliseconds.
"""

from __future__ import annotations

import time
import uuid

import pytest

from resilience.errors import DeadlineExceeded, RetriesExhausted
from resilience.fallback import Unavailable
from resilience.policy import Policy
from tests.integration._delivery import (  # noqa: F401  (fixtures)
    fast_policy,
    wait_dead,
    worker_env,
)
from workers.downstream import DownstreamClient
from workers.policy_file import load_policy_file
from workers.settings import load_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def shipped(policy_file):
    """Policies and clients built from the shipped policy file (URLs on the simulators)."""
    parsed = load_policy_file(policy_file)
    settings = load_settings(policy_file=policy_file)

    def build(name: str) -> tuple[Policy, DownstreamClient]:
        url = parsed.topology.dependency(name).url
        return Policy(parsed.configs[name]), DownstreamClient(name, url, settings)

    return build


def test_shipped_policy_is_the_seeds_budget(shipped):
    for name in ("payments", "pricing"):
        policy, _ = shipped(name)
        assert (policy.config.timeout, policy.config.deadline) == (0.08, 0.2)


def test_pricing_second_attempt_answers_within_the_deadline(sims, shipped):
    policy, client = shipped("pricing")
    sims["pricing"].control(stall_ms=1000, stall_requests=1)
    started = time.monotonic()
    answer = policy.call(client.get, "/price", sku="sku-1")
    took = time.monotonic() - started
    assert answer["sku"] == "sku-1"
    assert sims["pricing"].ledger()["requests"] == 2  # the stalled one, then the answer
    assert took < 1.0  # far below the stall: the answer is attempt 2's, not a late attempt 1


def test_keyed_charge_second_attempt_answers_once(sims, shipped):
    policy, client = shipped("payments")
    sims["payments"].control(stall_ms=1000, stall_requests=1)
    key = f"order-{uuid.uuid4()}"
    answer = policy.call(lambda: client.post("/effects/charge", {"amount_cents": 500},
                                             idempotency_key=key), idempotency_key=key)
    assert answer["key"] == key and answer["duplicate"] is False
    ledger = sims["payments"].ledger()
    assert ledger["requests"] == 2
    assert [a["key"] for a in ledger["applications"]] == [key]  # one charge


def test_unkeyed_charge_makes_exactly_one_attempt(sims, shipped):
    policy, client = shipped("payments")
    sims["payments"].control(stall_ms=1000, stall_requests=1)
    answer = policy.call(client.post, "/effects/charge", {"amount_cents": 500})
    assert sims["payments"].ledger()["requests"] == 1
    # the graceful fallback, not a second try; and honest: the request reached the provider
    assert isinstance(answer, Unavailable) and answer.outcome == "unknown"
    assert "not charged" not in answer.message and "not known" in answer.message


def test_refused_charge_says_not_charged(sims, shipped):
    policy, client = shipped("payments")
    policy.breaker.force_open(30)  # this policy's own (in-memory) breaker
    answer = policy.call(client.post, "/effects/charge", {"amount_cents": 500})
    assert sims["payments"].ledger()["requests"] == 0  # the open circuit refused it
    assert answer.outcome == "not_attempted" and "not been charged" in answer.message


def test_two_attempts_in_the_call_as_the_seed_says(sims, shipped):
    policy, client = shipped("pricing")
    sims["pricing"].control(stall_ms=1000, stall_requests=5)
    with pytest.raises((RetriesExhausted, DeadlineExceeded)):
        policy.call(client.get, "/price", sku="sku-2")
    assert sims["pricing"].ledger()["requests"] == 2


def test_a_job_never_makes_more_calls_than_its_max_attempts_across_deliveries(
        broker, sims, producer, start_worker, worker_env, celery_app):
    # each attempt answers 503 after 400 ms: in a 1 s deadline with 500 ms per attempt, two
    # fit in one delivery; the other two of the 4 go through the broker
    sims["email"].control(mode="failing", error_rate=1.0, latency_ms=400)
    start_worker("email", env=worker_env)
    producer.enqueue("email.send", ["a@x", "hi"], idempotency_key="mail-count")
    [record] = wait_dead(celery_app, "email", timeout=60)
    assert record.reason == "retries_exhausted" and record.attempts == 4
    assert sims["email"].ledger()["failed_attempts"] == {"mail-count": 4}
