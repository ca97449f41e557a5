"""``workers.transport``: a Redis message leaves its queue only together with its unacked record.

kombu's stock fetch (BRPOP, then HSET/ZADD from the consumer) loses a message whose worker is
SIGKILLed between the two (celery/celery#7950, celery/kombu#305). These tests run on the real
Redis broker of the test slot, with real ``celery -A workers worker`` subprocesses.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_BROKER_URL, Broker
from tests.support.procs import wait_until
from workers.topology import redis_priority_lists
from workers.transport import SIGNAL_PREFIX, Channel

pytestmark = pytest.mark.integration

# soft < hard < visibility (Settings.check): a dead consumer's message is back within seconds
SHORT_VISIBILITY = {"TIDEGATE_VISIBILITY_TIMEOUT_S": "6", "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "4",
                    "TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "3"}


@pytest.fixture
def broker(redis_up: str) -> Broker:
    """Redis only (overrides the conftest's redis/amqp parametrisation), emptied first."""
    redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
    return Broker("redis", REDIS_BROKER_URL)


@pytest.fixture
def r(broker: Broker):
    client = redis.Redis.from_url(broker.url, socket_timeout=5, socket_connect_timeout=2)
    yield client
    client.close()


def _ready(r: redis.Redis, queue: str) -> int:
    return sum(r.llen(k) for k in redis_priority_lists(queue))


def _consuming_channel(app, *queues: str) -> tuple[object, Channel]:
    conn = app.connection_for_read()
    channel = conn.channel()
    assert isinstance(channel, Channel), type(channel)
    for q in queues:
        channel.basic_consume(q, no_ack=False, callback=lambda m: None, consumer_tag=f"t-{q}")
    return conn, channel


def test_a_consumer_dead_right_after_the_pop_leaves_the_message_unacked_and_it_runs(
        sims, producer, celery_app, start_worker, r):
    job = producer.enqueue("search.index", ["doc-dead"])
    assert r.llen(SIGNAL_PREFIX + "search") == 1  # the publish rang the queue's signal list
    conn, channel = _consuming_channel(celery_app, "search")
    try:
        queue, payload, recorded = channel._fetch()  # the pop; this consumer now "dies"
    finally:
        conn.collect()  # drop it without closing: no graceful restore, like kill -9
    assert queue == "search" and payload["headers"]["id"] == job.id and recorded
    tag = payload["properties"]["delivery_tag"]
    stored, exchange, routing_key = json.loads(r.hget("unacked", tag))  # kombu's format
    assert stored == payload and routing_key == "search" and isinstance(exchange, str)
    assert time.time() - r.zscore("unacked_index", tag) < 30
    assert _ready(r, "search") == 0 and not r.exists(SIGNAL_PREFIX + "search")

    # kombu's own restore_visible brings it back after the visibility timeout; a worker runs it
    start_worker("search", env=SHORT_VISIBILITY)
    wait_until(lambda: "index:doc-dead" in sims["search"].ledger()["effects"], 60,
               interval=0.2, message="the dead consumer's message restored and run")
    wait_until(lambda: r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0, 30,
               message="the run acked")


def test_priority_order_is_kombus_across_steps_and_queues(producer, celery_app, r):
    for i in range(3):
        producer.enqueue("email.send", [f"low{i}@x", "s"], priority="low",
                         idempotency_key=f"low-{i}")
    producer.enqueue("search.index", ["doc-high"], priority="high")
    producer.enqueue("email.send", ["vip@x", "s"], priority="critical", idempotency_key="vip")
    conn, channel = _consuming_channel(celery_app, "email", "search")
    try:
        order = []
        while (fetched := channel._fetch()) is not None:
            queue, payload, _recorded = fetched
            order.append((queue, payload["headers"]["task"]))
            assert r.hexists("unacked", payload["properties"]["delivery_tag"])
    finally:
        conn.release()
    assert order == [("email", "email.send"), ("search", "search.index")] + \
        [("email", "email.send")] * 3, order
    assert r.hlen("unacked") == 5
    assert not r.exists(SIGNAL_PREFIX + "email") and not r.exists(SIGNAL_PREFIX + "search")


def test_the_consumer_does_not_record_a_fetched_message_again_and_a_restore_rings(
        producer, celery_app, r, monkeypatch):
    from kombu.transport import redis as kombu_redis

    appended: list[str] = []  # kombu's own HSET + ZADD, which FETCH made redundant
    stock_append = kombu_redis.QoS.append
    monkeypatch.setattr(kombu_redis.QoS, "append",
                        lambda qos, m, tag: appended.append(tag) or stock_append(qos, m, tag))
    job = producer.enqueue("search.index", ["doc-once"])
    got: list = []
    conn = celery_app.connection_for_read()
    try:
        channel = conn.channel()
        channel.basic_consume("search", no_ack=False, callback=got.append, consumer_tag="t")
        conn.drain_events(timeout=5)  # kombu's own poll: BRPOP on the signal list, then FETCH
        assert [m.headers["id"] for m in got] == [job.id]
        tag = got[0].delivery_tag
        assert appended == [] and tag in channel.qos._delivered  # kombu's QoS still counts it
        stored, exchange, routing_key = json.loads(r.hget("unacked", tag))
        assert stored == got[0]._raw and (exchange, routing_key) == (
            got[0].delivery_info["exchange"], got[0].delivery_info["routing_key"])
        assert r.zscore("unacked_index", tag) is not None
        assert not r.exists(SIGNAL_PREFIX + "search")

        channel.qos.restore_by_tag(tag)  # what the visibility timeout does to a dead worker's
        assert _ready(r, "search") == 1 and r.hlen("unacked") == 0
        assert r.llen(SIGNAL_PREFIX + "search") == 1  # found at once, not after BRPOP's timeout
        got.clear()
        conn.drain_events(timeout=5)
        assert [m.headers["id"] for m in got] == [job.id] and got[0].delivery_info["redelivered"]
        assert appended == [] and r.hexists("unacked", got[0].delivery_tag)
        got[0].ack()
        assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0
    finally:
        conn.release()


def test_messages_published_without_a_token_are_consumed(
        sims, settings, start_worker, r):
    from producers import Producer
    from workers.application import create_app

    stock = create_app(settings.model_copy(update={"redis_reliable_fetch": False}))
    try:
        assert stock.connection_for_write().get_transport_cls().__module__ == \
            "kombu.transport.redis"
        plain = Producer(stock)
        for i in range(10):
            plain.enqueue("search.index", [f"plain-{i}"])
        stock.send_task("search.index", ["bare"], queue="search")  # a bare Celery producer
    finally:
        stock.close()
    assert _ready(r, "search") == 11 and not r.exists(SIGNAL_PREFIX + "search")
    start_worker("search", concurrency=2)
    started = time.monotonic()
    wait_until(lambda: sims["search"].ledger()["applied"] == 11, 30, interval=0.1,
               message="11 untokened messages consumed")
    print(f"\n11 untokened messages consumed in {time.monotonic() - started:.1f}s")


def test_sigkill_storm_loses_nothing(sims, producer, start_worker, r, tmp_path: Path):
    """A worker SIGKILLed again and again while idempotent jobs flow: jobs in = jobs done."""
    jobs, kills = 300, 10
    for name in ("search", "email"):
        sims[name].control(mode="slow", latency_ms=30)
    rng = random.Random(7950)
    expected: dict[str, set[str]] = {"search": set(), "email": set()}
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            for i in range(jobs):
                if i % 2:
                    producer.enqueue("search.index", [f"storm-{i}"])
                    expected["search"].add(f"index:storm-{i}")
                else:
                    producer.enqueue("email.send", [f"s{i}@x", "hi"], idempotency_key=f"storm-{i}")
                    expected["email"].add(f"storm-{i}")
                time.sleep(rng.uniform(0, 0.04))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    feeder = threading.Thread(target=feed, name="storm-feeder", daemon=True)
    worker = start_worker("search,email", env=SHORT_VISIBILITY, concurrency=4)
    feeder.start()
    for _ in range(kills):
        before = sum(sims[n].ledger()["applied"] for n in ("search", "email"))
        # kill while it is fetching: once it has done some work, at a random moment
        wait_until(lambda b=before: sum(sims[n].ledger()["applied"]
                                        for n in ("search", "email")) > b, 60,
                   interval=0.02, message="the worker at work")
        time.sleep(rng.uniform(0, 0.3))  # the kill moment: random by design, not a sync wait
        worker.kill(signal.SIGKILL)
        wait_until(lambda w=worker: not w.alive(), 10, message="the worker gone")
        worker = start_worker("search,email", env=SHORT_VISIBILITY, concurrency=4)
    feeder.join(120)
    assert not feeder.is_alive() and not errors, errors

    def done() -> bool:
        return all(expected[n] <= set(sims[n].ledger()["effects"]) for n in expected)

    wait_until(done, 120, interval=0.5, message=f"all {jobs} jobs done")
    effects = {n: sims[n].ledger()["effects"] for n in expected}
    reruns = sum(e["requests"] - 1 for n in effects for e in effects[n].values())
    lost = sum(len(expected[n] - set(effects[n])) for n in expected)
    print(f"\nSIGKILL storm: {jobs} jobs in, {jobs - lost} done, {lost} lost, {kills} kills, "
          f"{reruns} idempotent re-runs")
    assert lost == 0
    wait_until(lambda: r.hlen("unacked") == 0, 30, message="nothing left unacked")
    assert _ready(r, "search") == _ready(r, "email") == 0
