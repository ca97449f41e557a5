"""The orphan sweep against real Redis, through the reliable-fetch transport (no worker process).

Which messages a sweep restores: those of a holder whose heartbeat is gone, fetched at least
the grace ago; never a live holder's, never one fetched within the grace, never one acked;
and one sweeper per interval (the lock).
"""

from __future__ import annotations

import json

import pytest
import redis

from tests.conftest import REDIS_BROKER_URL

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(redis_up, policy_file):
    from kombu import Connection

    from workers import liveness
    from workers.application import create_app
    from workers.installation import installation
    from workers.settings import load_settings

    redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
    app = create_app(load_settings(broker_url=REDIS_BROKER_URL, policy_file=policy_file))
    conn = Connection(REDIS_BROKER_URL, transport=app.conf.broker_transport,
                      transport_options=app.conf.broker_transport_options)
    ch = conn.channel()
    installation(app).topology.declare(conn)
    ch.basic_consume("search", False, lambda m: None, "orphan-test")
    yield ch
    liveness._set_holder(None)
    conn.release()
    app.close()


def publish(channel, n: int) -> None:
    from kombu import Exchange, Producer

    producer = Producer(channel, exchange=Exchange("search", type="direct"),
                        routing_key="search")
    for i in range(n):
        producer.publish({"i": i}, serializer="json", headers={"id": f"t{i}"})


def fetch_as(channel, holder: str | None) -> str:
    """Fetch one message with ``holder`` as this process's liveness id; returns its tag."""
    from workers import liveness

    liveness._set_holder(holder)
    queue, payload, recorded = channel._fetch()
    assert recorded and queue == "search"
    return payload["properties"]["delivery_tag"]


def sweeper(channel, grace_s: float = 0.0, interval_s: float = 0.2):
    from workers.orphans import Sweeper

    return Sweeper(channel, owner="tester", interval_s=interval_s, grace_s=grace_s)


def beat(client, worker: str, ttl_s: float = 30) -> None:
    from workers.liveness import Registry, WorkerRecord

    Registry(client).beat(WorkerRecord(worker, "n", 1, ("search",), 0.0, 1.0), ttl_s)


def test_only_a_dead_holders_messages_go_back_marked_redelivered(channel):
    from workers.orphans import ORPHANS_RESTORED
    from workers.transport import HOLDERS_KEY

    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    publish(channel, 3)
    dead = [fetch_as(channel, "w-dead"), fetch_as(channel, "w-dead")]
    live = fetch_as(channel, "w-live")
    beat(client, "w-live")
    assert client.llen("search") == 0 and client.hlen(HOLDERS_KEY) == 3
    before = ORPHANS_RESTORED.labels(queue="search")._value.get()

    assert sweeper(channel).sweep() == 2
    assert client.llen("search") == 2
    restored = [json.loads(m) for m in client.lrange("search", 0, -1)]
    assert {m["properties"]["delivery_tag"] for m in restored} == set(dead)
    assert all(m["properties"]["delivery_info"]["redelivered"] for m in restored)
    assert client.hkeys(HOLDERS_KEY) == [live.encode()]
    assert client.hexists("unacked", live) and not any(client.hexists("unacked", t) for t in dead)
    assert ORPHANS_RESTORED.labels(queue="search")._value.get() == before + 2


def test_a_message_fetched_within_the_grace_stays(channel):
    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    publish(channel, 1)
    fetch_as(channel, "w-starting")  # no beat yet: a worker that has just started
    assert sweeper(channel, grace_s=30).sweep() == 0
    assert client.llen("search") == 0 and client.hlen("unacked") == 1


def test_an_acked_message_leaves_no_holder_and_one_sweeper_per_interval(channel):
    from workers.transport import HOLDERS_KEY

    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    publish(channel, 2)
    acked = fetch_as(channel, "w-dead")
    channel.qos.ack(acked)
    assert not client.hexists(HOLDERS_KEY, acked)  # removed in the ack's own pipeline
    fetch_as(channel, "w-dead")
    first, second = sweeper(channel, interval_s=30), sweeper(channel, interval_s=30)
    assert first.find() is not None
    assert second.find() is None  # the lock: another worker swept this interval


def test_depth_and_exporter_show_live_workers_and_work_held_by_dead_ones(
        channel, policy_file, state_redis, tmp_path):
    """`tidegate depth` shows what dead workers hold until the sweep restores it; the exporter
    counts live workers per queue and, through the workers' counter mirror, the restores."""
    from tests.conftest import Broker, tidegate_env
    from tests.integration.test_exporter import _depth_json
    from tests.support.exporter import Exporter, sample
    from workers.cluster_metrics import CounterMirror, read_cluster_counters

    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    env = tidegate_env(Broker("redis", REDIS_BROKER_URL), policy_file)
    publish(channel, 3)
    for _ in range(2):
        fetch_as(channel, "w-dead")
    fetch_as(channel, "w-live")
    beat(client, "w-live")
    rows = {q["name"]: q for q in _depth_json(env)["queues"]}
    assert (rows["search"]["in_flight"], rows["search"]["orphaned"]) == (3, 2)
    assert (rows["search"]["live_workers"], rows["payments"]["live_workers"]) == (1, 0)
    assert rows["payments"]["orphaned"] == 0

    mirror = CounterMirror(state_redis)
    mirror.flush()  # this process's counts from earlier tests
    before = dict((tuple(lb.items()), v) for lb, v in read_cluster_counters(state_redis).get(
        "tidegate_cluster_orphans_restored", [])).get((("queue", "search"),), 0.0)
    assert sweeper(channel).sweep() == 2
    mirror.flush()  # what each worker's mirror does every 5 s
    rows = {q["name"]: q for q in _depth_json(env)["queues"]}
    assert (rows["search"]["in_flight"], rows["search"]["orphaned"]) == (1, 0)
    exporter = Exporter(env, tmp_path)
    try:
        s = exporter.samples()
    finally:
        exporter.stop()
    assert sample(s, "tidegate_queue_live_workers", queue="search") == 1
    assert sample(s, "tidegate_queue_orphaned_messages", queue="search") == 0
    assert sample(s, "tidegate_cluster_orphans_restored_total", queue="search") == before + 2
    assert sample(s, "tidegate_cluster_orphan_wait_seconds_total", queue="search") >= 0
