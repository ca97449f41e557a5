"""Depth probes against the truth on real brokers: Redis, RabbitMQ and SQS (moto server)."""

from __future__ import annotations

import os
import time

import boto3
import pytest
import redis

from resilience.shedding import Priority
from tests.conftest import STATE_REDIS_URL
from tests.support.procs import free_port, wait_until
from workers.depth import (
    DepthUnavailable,
    QueueDepth,
    RedisDepthProbe,
    SharedDepthCache,
    SQSDepthProbe,
    drain_from_samples,
    probe_for,
)
from workers.topology import redis_priority_lists

pytestmark = pytest.mark.integration


def _publish(producer, task: str, priorities: list[Priority]) -> None:
    for i, p in enumerate(priorities):
        producer.enqueue(task, [f"doc-{i}"], priority=p)


def test_depth_matches_truth_on_each_broker(broker, settings, producer, celery_app):
    """ready counts every priority; taking messages without ack moves them to in_flight."""
    probe = probe_for(settings)
    assert probe.depth("search").ready == 0
    t0 = time.time()
    prios = [Priority.LOW] * 3 + [Priority.MEDIUM] * 2 + [Priority.HIGH] * 4 + [Priority.CRITICAL]
    _publish(producer, "search.index", prios)
    producer.enqueue("email.send", ["a@example.com", "hi", "body"])

    d = probe.depth("search")
    assert (d.queue, d.ready, d.delayed) == ("search", 10, None)
    assert d.backlog == 10
    assert probe.depth("email").ready == 1
    assert probe.depth("payments").ready == 0

    if broker.name == "redis":
        r = redis.Redis.from_url(broker.url)
        # kombu's stock layout: "search", then "search\x06\x163" ... (its default separator)
        lengths = [r.llen(k) for k in redis_priority_lists("search")]
        assert lengths == [1, 4, 2, 3]
        assert redis_priority_lists("search")[1] == "search\x06\x163"
        assert d.source == "redis"
        assert d.in_flight == 0
        assert d.oldest_age_s is not None
        assert 0 <= d.oldest_age_s <= time.time() - t0 + 1
    else:  # scripts/services.sh enables the management plugin: unacked is known
        assert d.source == "rabbitmq+management"
        assert d.in_flight is not None
        assert d.consumers == 0
        assert d.oldest_age_s is None

    # Take 3 messages without acking them: they leave "ready" and show as in flight. The
    # management API's figures lag by its stats interval (5 s), so RabbitMQ's are polled.
    with celery_app.connection_for_read() as conn:
        channel = conn.channel()
        taken = [channel.basic_get("search", no_ack=False) for _ in range(3)]
        assert all(m is not None for m in taken)
        assert probe.depth("search").ready == 7
        _wait_in_flight(probe, "search", 3)
        assert probe.depth("email").in_flight == 0  # filtered by queue
        for m in taken:
            channel.basic_ack(m.delivery_tag)
    assert probe.depth("search").ready == 7
    _wait_in_flight(probe, "search", 0)


def _wait_in_flight(probe, queue: str, expected: int) -> None:
    """Poll (bounded) until the probe reports ``expected`` unacked messages on ``queue``."""
    wait_until(lambda: probe.depth(queue).in_flight == expected, 30, interval=0.25,
               message=f"{queue} in_flight == {expected} "
                       f"(last: {probe.depth(queue).in_flight})")


def test_redis_oldest_age_reads_the_next_message_out(redis_up):
    """The tail of each priority list is its oldest; the queue's oldest is the oldest tail."""
    import json

    r = redis.Redis.from_url(redis_up)
    p0, p3, _, p9 = redis_priority_lists("agetest")
    r.delete(p0, p3, p9)
    now = time.time()

    def msg(t: float) -> str:
        return json.dumps({"headers": {"tidegate_enqueued_at": t}, "body": ""})

    r.lpush(p9, msg(now - 50), msg(now - 5))  # tail = now-50
    r.lpush(p3, msg(now - 20))
    r.lpush(p0, msg(now - 1))
    d = RedisDepthProbe(r, clock=lambda: now).depth("agetest")
    assert d.ready == 4
    assert d.oldest_age_s == pytest.approx(50, abs=0.01)
    r.delete(p0, p3, p9)


def test_rabbitmq_unknown_queue_and_unreachable_broker(rabbitmq_up):
    from workers.depth import RabbitMQDepthProbe

    probe = RabbitMQDepthProbe(rabbitmq_up, management_url=None, missing_ttl_s=60)
    with pytest.raises(DepthUnavailable, match="no queue 'nope'"):
        probe.depth("nope")
    # the broker closed the channel, not the connection: the probe keeps its connection
    conn = probe._conn
    assert conn is not None and conn.connected
    with pytest.raises(DepthUnavailable, match="seen missing"):  # remembered, no I/O
        probe.depth("nope")
    probe.close()
    dead = RabbitMQDepthProbe("amqp://guest:guest@127.0.0.1:1//", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DepthUnavailable):
        dead.depth("search")
    assert time.monotonic() - started < 10


def test_rabbitmq_probe_of_a_missing_queue_keeps_its_connection(rabbitmq_up):
    """The API's refresher asks for every work queue 20 times a second; one not declared yet
    cost a new connection each time (a handshake and a login: ~20% of a core)."""
    from kombu import Connection

    from workers.depth import RabbitMQDepthProbe

    queue = f"tg-probe-late-{os.getpid()}"
    probe = RabbitMQDepthProbe(rabbitmq_up, management_url=None, missing_ttl_s=0.0)
    try:
        with pytest.raises(DepthUnavailable, match="no queue"):
            probe.depth(queue)
        conn = probe._conn
        with Connection(rabbitmq_up) as other:  # declared by someone else meanwhile
            other.default_channel.queue_declare(queue, auto_delete=False)
            try:
                assert probe.depth(queue).ready == 0  # seen at once (no miss remembered)
                assert probe._conn is conn  # same connection, a new channel
                with pytest.raises(DepthUnavailable, match="no queue"):
                    probe.depth(f"{queue}-nope")
                assert probe.depth(queue).ready == 0 and probe._conn is conn
            finally:
                other.default_channel.queue_delete(queue)
    finally:
        probe.close()


@pytest.fixture
def amqp_unmanaged(rabbitmq_up, policy_file, state_redis, monkeypatch):
    """Settings + app on RabbitMQ (search emptied), TIDEGATE_RABBITMQ_MANAGEMENT_URL pointing
    at a free port: the management API as a deployment without the plugin sees it."""
    from tests.conftest import _purge_amqp
    from workers.application import create_app
    from workers.settings import load_settings

    _purge_amqp(rabbitmq_up, ["search"])
    monkeypatch.setenv("TIDEGATE_RABBITMQ_MANAGEMENT_URL", f"http://127.0.0.1:{free_port()}")
    settings = load_settings(broker_url=rabbitmq_up, redis_url=STATE_REDIS_URL,
                             policy_file=policy_file, connect_timeout_s=1.0)
    app = create_app(settings)
    yield settings, app
    app.close()


def test_rabbitmq_in_flight_is_none_when_the_management_api_is_unreachable(amqp_unmanaged):
    """Ready stays exact, in flight is None (never a made-up 0), and the probe answers within
    its connect timeout instead of failing."""
    from producers import Producer

    settings, app = amqp_unmanaged
    Producer(app).enqueue("search.index", ["doc-x"])
    probe = probe_for(settings)
    with app.connection_for_read() as conn:
        channel = conn.channel()
        held = channel.basic_get("search", no_ack=False)
        assert held is not None
        started = time.monotonic()
        d = probe.depth("search")
        assert time.monotonic() - started < 10
        assert (d.ready, d.in_flight, d.source) == (0, None, "rabbitmq")
        channel.basic_ack(held.delivery_tag)


def test_sqs_depth_counts_visible_in_flight_and_delayed(moto_sqs):
    client = boto3.client("sqs", endpoint_url=moto_sqs.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    url = client.create_queue(QueueName="depth-q")["QueueUrl"]
    client.purge_queue(QueueUrl=url)
    for i in range(5):
        client.send_message(QueueUrl=url, MessageBody=f"m{i}")
    for i in range(2):
        client.send_message(QueueUrl=url, MessageBody=f"late{i}", DelaySeconds=600)
    got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=600)
    assert len(got["Messages"]) == 2

    probe = SQSDepthProbe(client)
    d = probe.depth("depth.q")  # dots become dashes, as kombu names SQS queues
    assert (d.ready, d.in_flight, d.delayed) == (3, 2, 2)
    assert d.backlog == 5
    assert d.oldest_age_s is None and d.source == "sqs"
    with pytest.raises(DepthUnavailable, match="no queue"):
        probe.depth("missing")


def test_probe_for_sqs_settings(moto_sqs, policy_file, monkeypatch):
    from workers.settings import load_settings

    settings = load_settings(broker_url=f"sqs://testing:testing@127.0.0.1:{moto_sqs.port}/",
                             sqs_endpoint_url=moto_sqs.url, policy_file=policy_file)
    client = boto3.client("sqs", endpoint_url=moto_sqs.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    url = client.create_queue(QueueName="probe-for")["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody="x")
    probe = probe_for(settings)
    assert isinstance(probe, SQSDepthProbe)
    assert probe.depth("probe-for").ready == 1


class CountingProbe:
    def __init__(self) -> None:
        self.calls = 0
        self.ready = 100

    def depth(self, queue: str) -> QueueDepth:
        self.calls += 1
        return QueueDepth(queue, self.ready, 0, None, None, None, "fake", time.time())


def test_shared_cache_probes_once_per_ttl_across_processes(state_redis):
    probe = CountingProbe()
    clients = [redis.Redis.from_url(STATE_REDIS_URL, socket_timeout=2) for _ in range(5)]
    # five "processes"
    caches = [SharedDepthCache(probe, c, ttl_s=30, window_s=60) for c in clients]
    for _ in range(20):
        for cache in caches:
            assert cache.depth("q").ready == 100
    assert probe.calls == 1

    caches[0].record_published("q", 7)
    caches[3].record_published("q")
    # Counted locally, merged within flush_s; another process sees them within reuse_s more.
    # Its own publishes at once; the other process's one too if this estimate came late
    # enough (after reuse_s) to re-read the counter after that process's flush (a stall).
    assert caches[0].estimate("q").published_since in (7, 8)
    est = wait_until(lambda: (e := caches[1].estimate("q")).published_since == 8 and e, 5,
                     message="publishes of two processes seen by a third")
    assert (est.reading.ready, est.published_since, est.backlog) == (100, 8, 108)
    assert probe.calls == 1


def test_shared_cache_measures_the_drain_rate(state_redis):
    probe = CountingProbe()
    now = [1000.0]
    probe_clock = CountingProbe.depth

    def depth(self, queue):
        self.calls += 1
        return QueueDepth(queue, self.ready, 0, None, None, None, "fake", now[0])

    CountingProbe.depth = depth  # readings stamped with the fake clock
    try:
        cache = SharedDepthCache(probe, state_redis, ttl_s=0.5, clock=lambda: now[0])
        assert cache.estimate("q").drain_rate is None  # one reading: no rate yet
        # 1 s later: 40 published, backlog 100 -> 90: 50 consumed in 1 s.
        cache.record_published("q", 40)
        now[0] += 1.0
        probe.ready = 90
        assert cache.estimate("q").drain_rate == pytest.approx(50)
    finally:
        CountingProbe.depth = probe_clock


def test_a_cache_whose_redis_is_gone_costs_no_wait_and_is_collected_with_its_producer():
    """A producer whose state Redis went away (a failover drill, a decommissioned server) must
    not make every later flush_all wait out a connect timeout, nor live on in its thread."""
    import gc
    import socket
    import weakref

    from workers.depth import _LIVE_CACHES, flush_all

    # A server that takes connections and never answers: each try waits its socket_timeout.
    silent = socket.create_server(("127.0.0.1", 0))
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(port=silent.getsockname()[1], socket_connect_timeout=3,
                       socket_timeout=3, retry=Retry(NoBackoff(), 0))
    cache = SharedDepthCache(CountingProbe(), dead, ttl_s=30, window_s=60)
    try:
        cache.record_published("q", 3)
        wait_until(lambda c=cache: c.failing, 30, message="the background merge failed")
        started = time.monotonic()
        flush_all(skip_failing=True)
        assert time.monotonic() - started < 2.0  # a try would have waited 3 s
        assert cache._pending == {"q": 3}  # kept for a later merge
    finally:
        silent.close()
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None, "the flusher thread kept the cache alive"
    assert all(c is not None for c in _LIVE_CACHES)


def test_drain_from_samples_uses_the_window_and_never_goes_negative():
    # newest first: [time, published, backlog]
    assert drain_from_samples([[10, 0, 5]], 10) is None
    assert drain_from_samples([[10, 100, 50], [8, 0, 0]], 10) == pytest.approx(25)
    # nothing counted as published but the backlog fell: at least that
    assert drain_from_samples([[10, 0, 10], [8, 0, 30]], 10) == pytest.approx(10)
    # backlog grew by more than published (an uncounted publisher): 0, not negative
    assert drain_from_samples([[10, 0, 50], [8, 0, 10]], 10) == 0
    # samples older than the window are ignored
    assert drain_from_samples([[100, 10, 0], [99, 0, 0], [1, -1000, 0]], 10) == 10


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_redis_in_flight_tells_held_countdowns_apart(broker, settings, producer, celery_app):
    """A retry a worker holds until its countdown ends is unacked like a running task; the
    probe counts it in flight and, apart, as held (the status page's retries waiting)."""
    probe = probe_for(settings)
    producer.enqueue("search.index", ["doc-now"])
    celery_app.send_task("search.index", ["doc-later"], queue="search", countdown=120)
    with celery_app.connection_for_read() as conn:
        channel = conn.channel()
        taken = [channel.basic_get("search", no_ack=False) for _ in range(2)]
        assert all(m is not None for m in taken)
        d = probe.depth("search")
        assert (d.ready, d.in_flight, d.held_retries) == (0, 2, 1)
        for m in taken:
            channel.basic_ack(m.delivery_tag)
    assert probe.depth("search").held_retries == 0


def test_live_workers_and_their_capacity_per_queue(state_redis):
    """Capacity is the summed pool size of the live workers on a queue; a dead worker's does
    not count, and a live one that never said its size (an older version) makes it unknown."""
    from workers.liveness import Registry, WorkerRecord, live_per_queue

    registry = Registry(state_redis, prefix="test-capacity.")
    now = time.time()
    registry.beat(WorkerRecord("a", "n", 1, ("search",), now, now, 3), 30)
    registry.beat(WorkerRecord("b", "n", 2, ("search", "email"), now, now, 5), 30)
    registry.beat(WorkerRecord("dead", "n", 3, ("search",), now, now, 7), 30)
    state_redis.delete(registry.heartbeat_key("dead"))
    assert live_per_queue(registry, ["search", "email", "payments"]) == (
        {"search": 2, "email": 1, "payments": 0}, {"search": 8, "email": 5, "payments": 0})
    old = WorkerRecord("old", "n", 4, ("email",), now, now)
    registry.beat(old, 30)
    assert WorkerRecord.from_json(old.to_json()) == old
    assert live_per_queue(registry, ["email"])[1] == {"email": None}
