"""Producer -> broker -> ``celery -A workers worker -Q payments`` -> downstream, for real."""

from __future__ import annotations

import time

import pytest
import redis

from tests.conftest import REDIS_BROKER_URL
from tests.support.procs import wait_until
from workers.topology import redis_priority_lists

pytestmark = pytest.mark.integration


def _queue_depth(broker, queue: str) -> int:
    if broker.name == "redis":
        client = redis.Redis.from_url(REDIS_BROKER_URL)
        keys = redis_priority_lists(queue)
        return sum(client.llen(k) for k in keys)
    from kombu import Connection

    with Connection(broker.url, connect_timeout=5) as conn:
        return conn.default_channel.queue_declare(queue, passive=True).message_count


def test_payments_worker_runs_payments_only(broker, sims, producer, start_worker):
    """One queue per dependency: the payments worker charges, and leaves search alone."""
    start_worker("payments")
    charge = producer.enqueue("payments.charge", ["acct-1", 1250], idempotency_key="order-1",
                              priority="critical")
    search = producer.enqueue("search.index", ["doc-1"], {"body": {"t": "x"}})
    assert (charge.queue, search.queue) == ("payments", "search")

    ledger = wait_until(lambda: (lg := sims["payments"].ledger())["applied"] == 1 and lg,
                        30, message="the charge in the payments ledger")
    effect = ledger["effects"]["order-1"]
    assert effect["payload"] == {"account": "acct-1", "amount_cents": 1250, "currency": "EUR"}
    assert effect["requests"] == 1

    # The search task stays queued: nobody consumes `search` here.
    assert _queue_depth(broker, "search") == 1
    assert sims["search"].ledger()["requests"] == 0


def test_search_worker_drains_its_queue(broker, sims, producer, start_worker):
    ids = [producer.enqueue("search.index", [f"doc-{i}"]).id for i in range(20)]
    assert len(set(ids)) == 20
    start_worker("search", concurrency=4)
    wait_until(lambda: sims["search"].ledger()["applied"] == 20, 60,
               message="20 documents indexed")
    assert sorted(sims["search"].ledger()["effects"]) == sorted(f"index:doc-{i}"
                                                                  for i in range(20))
    wait_until(lambda: _queue_depth(broker, "search") == 0, 10, message="search queue empty")


def test_priority_jumps_the_queue(broker, sims, producer, start_worker):
    """CRITICAL work queued behind LOW work is consumed first, on both brokers."""
    for i in range(10):
        producer.enqueue("email.send", [f"low{i}@x", "s"], priority="low",
                         idempotency_key=f"low-{i}")
    producer.enqueue("email.send", ["vip@x", "s"], priority="critical", idempotency_key="vip")
    time.sleep(0.2)  # let RabbitMQ settle the priority heap before a consumer exists
    start_worker("email", concurrency=1)
    wait_until(lambda: sims["email"].ledger()["applied"] == 11, 60, message="11 emails")
    effects = sims["email"].ledger()["effects"]
    order = sorted(effects, key=lambda k: effects[k]["applied_at"])
    assert order.index("vip") <= 1, order  # prefetch may already hold one LOW message
