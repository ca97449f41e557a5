"""A 409 from the provider for the task's own key (a request with it still in progress there):
neither a success nor a failure that dead-letters, and never a second effect. The task is
tried again later with the same key and gets the first request's outcome."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.integration._delivery import dead_letters, marks
from tests.support.policy import with_timeouts
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration


def test_a_409_for_our_key_waits_for_the_first_requests_outcome(
        broker, sims, producer, start_worker, celery_app, state_redis, policy_file,
        tmp_path: Path):
    payments = sims["payments"]
    slow = with_timeouts(policy_file, "payments", 10_000, 20_000, tmp_path / "policy.toml")
    worker = start_worker("payments", env={"TIDEGATE_POLICY_FILE": str(slow)})
    # Long enough for our worker to meet the earlier request in progress (the 409), short
    # enough that it is over well before our job's retries run out.
    payments.control(latency_ms=3000)
    # Someone else's request with the key is at the provider first (a run of ours that was
    # lost with its worker looks the same from here).
    first: dict = {}
    earlier = threading.Thread(target=lambda: first.update(httpx.post(
        f"{payments.url}/effects/charge", json={"account": "acct-409", "amount_cents": 100},
        headers={"Idempotency-Key": "order-409"}, timeout=30).json()))
    earlier.start()
    wait_until(lambda: "order-409" in payments.ledger()["in_progress"], 10,
               message="the earlier request in progress")
    producer.enqueue("payments.charge", ["acct-409", 100], idempotency_key="order-409")
    wait_until(lambda: payments.ledger()["conflicts"] >= 1, 30, message="the 409")
    assert marks(state_redis, "payments.charge").get("key:order-409", {}).get("s") != "done"
    earlier.join(30)
    done = wait_until(lambda: (m := marks(state_redis, "payments.charge").get(
        "key:order-409", {})).get("s") == "done" and m, 60, message="the charge done")
    assert done["r"]["id"] == first["id"] and done["r"]["duplicate"] is True
    ledger = payments.ledger()
    assert ledger["applied"] == 1, ledger  # one effect, the earlier request's
    assert dead_letters(celery_app, "payments") == []
    assert "InProgress" in worker.output()
