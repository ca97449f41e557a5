"""``workers.ack_writes``: a task's done mark and its message's ack go in one socket write.

On the real Redis broker of the test slot (its state database on the same server): a message
fetched by the reliable-fetch transport, a done mark handed over for its ack, then kombu's ack
(or reject) as Celery calls it. A worker end to end: tests/integration/test_pipeline.py and
the delivery tests, which run every task through this path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from kombu.transport import virtual

from tests.conftest import BROKER_DB, REDIS_BROKER_URL, STATE_DB, STATE_REDIS_URL, Broker
from tests.support.procs import wait_until
from workers import ack_writes
from workers.redis_line import ReplyLater
from workers.topology import redis_priority_lists
from workers.transport import HOLDERS_KEY, Channel

pytestmark = pytest.mark.integration

MARK = "tidegate:idem:test.ack_writes:"


@pytest.fixture
def broker(redis_up: str) -> Broker:
    """Redis only (overrides the conftest's redis/amqp parametrisation), emptied first."""
    redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
    return Broker("redis", REDIS_BROKER_URL)


@pytest.fixture
def r(broker: Broker) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker.url, socket_timeout=5, socket_connect_timeout=2)
    yield client
    client.close()


@pytest.fixture
def line(state_redis: redis.Redis) -> Iterator[ReplyLater]:
    later = ReplyLater(redis.Redis.from_url(STATE_REDIS_URL, socket_timeout=5))
    yield later
    later.close()


def _fetched(producer, celery_app, job_id_arg: str) -> tuple[object, Channel, str, str]:
    """One job published and fetched by the transport, held as Celery's consumer holds it."""
    job = producer.enqueue("search.index", [job_id_arg])
    conn = celery_app.connection_for_read()
    channel = conn.channel()
    assert isinstance(channel, Channel), type(channel)
    channel.basic_consume("search", no_ack=False, callback=lambda m: None, consumer_tag="t")
    assert ack_writes.rides_here()  # a consumer with acks started in this process
    queue, payload, recorded = channel._fetch()
    assert queue == "search" and payload["headers"]["id"] == job.id and recorded
    tag = payload["properties"]["delivery_tag"]
    virtual.QoS.append(channel.qos, channel.Message(payload, channel=channel), tag)
    return conn, channel, job.id, tag


def _rider(line: ReplyLater, mark: str, sent: list | None = None) -> ack_writes.Rider:
    def send(*commands):
        if sent is not None:
            sent.append(commands)
        line.send_many(*commands)

    return ack_writes.Rider((("SET", mark, json.dumps({"s": "done"}), "PX", 60_000),),
                            send, (STATE_DB, BROKER_DB))


def test_the_done_mark_and_the_ack_go_in_one_write_mark_first(
        producer, celery_app, state_redis, r, line):
    conn, channel, job_id, tag = _fetched(producer, celery_app, "ack-ride")
    sent: list = []
    try:
        assert ack_writes.ride_with_ack(job_id, _rider(line, MARK + job_id, sent))
        channel.qos.ack(tag)
        line.flush()  # the replies (nothing waited for them)
    finally:
        conn.release()
    # one socket write: the mark, SELECT broker, the ack, SELECT back
    assert len(sent) == 1 and sent[0][0][:2] == ("SET", MARK + job_id)
    assert [c[0] for c in sent[0][1:]] == ["SELECT", "ZREM", "HDEL", "HDEL", "SELECT"]
    assert json.loads(state_redis.get(MARK + job_id))["s"] == "done"
    assert not r.hexists("unacked", tag) and r.zscore("unacked_index", tag) is None
    assert not r.hexists(HOLDERS_KEY, tag)
    assert not state_redis.exists("unacked")  # the ack ran on the broker's database
    # and the line is back on the state database for the thread's next writes
    line.send("SET", MARK + "next", "1", "PX", 60_000)
    line.flush()
    assert state_redis.get(MARK + "next") == b"1" and not r.exists(MARK + "next")
    assert ack_writes.take(job_id) == []  # taken by the ack


def test_a_rejected_message_sends_its_writes_on_their_own(
        producer, celery_app, state_redis, r, line):
    conn, channel, job_id, tag = _fetched(producer, celery_app, "ack-reject")
    try:
        assert ack_writes.ride_with_ack(job_id, _rider(line, MARK + job_id))
        channel.qos.reject(tag, requeue=True)
        line.flush()
    finally:
        conn.release()
    assert json.loads(state_redis.get(MARK + job_id))["s"] == "done"
    assert sum(r.llen(k) for k in redis_priority_lists("search")) == 1  # back in its queue
    assert not r.hexists("unacked", tag)


def test_a_channel_closed_before_the_ack_stores_the_mark_before_the_redelivery(
        producer, celery_app, state_redis, r, line):
    """The connection goes before Celery acks a finished task: kombu restores the message;
    its done mark, which waited for that ack, is stored too (a redelivery must find it)."""
    conn, channel, job_id, _ = _fetched(producer, celery_app, "ack-restore")
    try:
        assert ack_writes.ride_with_ack(job_id, _rider(line, MARK + job_id))
        channel.qos.restore_unacked()  # what kombu does as the channel closes
        line.flush()
    finally:
        conn.release()
    assert json.loads(state_redis.get(MARK + job_id))["s"] == "done"
    assert sum(r.llen(k) for k in redis_priority_lists("search")) == 1  # back in its queue
    assert ack_writes.take(job_id) == []  # nothing left waiting


def test_a_line_that_cannot_write_falls_back_to_kombus_ack(
        producer, celery_app, state_redis, r, line):
    conn, channel, job_id, tag = _fetched(producer, celery_app, "ack-fallback")
    calls: list = []

    def send(*commands):
        calls.append(commands)
        if len(commands) > 1:  # the mark with the ack
            raise OSError("line down")
        line.send_many(*commands)

    rider = ack_writes.Rider((("SET", MARK + job_id, "done", "PX", 60_000),), send,
                             (STATE_DB, BROKER_DB))
    try:
        assert ack_writes.ride_with_ack(job_id, rider)
        channel.qos.ack(tag)  # no error: the writes alone, then kombu's own ack
        line.flush()
    finally:
        conn.release()
    assert len(calls) == 2 and state_redis.get(MARK + job_id) == b"done"
    wait_until(lambda: not r.hexists("unacked", tag), 10, message="kombu's ack applied")


def test_no_ride_in_a_process_that_does_not_consume(monkeypatch):
    monkeypatch.setattr(ack_writes, "_consumer_pid", -1)  # e.g. a prefork child
    assert not ack_writes.rides_here()
    assert not ack_writes.ride_with_ack("job", ack_writes.Rider((), lambda *c: None, (1, 0)))
    assert ack_writes.take("job") == []


def test_a_riding_done_mark_is_handed_over_only_once_its_threads_writes_are_stored(
        state_redis, line):
    """The ride goes out on the acking thread's line, not on the task thread's: the lease and
    "running" the task thread sent without waiting must be stored before it is handed over,
    or Redis could run them after the done mark (no order between two connections)."""
    from workers.idempotency import IdempotencyStore

    store = IdempotencyStore(redis.Redis.from_url(STATE_REDIS_URL, socket_timeout=5),
                             replies=line)
    running = ("SET", "tidegate:job:test-ride", "running", "PX", 60_000)
    try:
        assert store.hold("test.ack_writes", "k1", also=(running,))
        assert line.unread() == 2  # sent, not answered
        seen: list = []

        def ride(commands, send) -> bool:
            seen.append((line.unread(),
                         state_redis.exists(store.lease_key("test.ack_writes", "k1")),
                         state_redis.get("tidegate:job:test-ride")))
            return True

        assert store.finish("test.ack_writes", "k1", ride=ride)
        assert seen == [(0, 1, b"running")]
    finally:
        store.let_go("test.ack_writes", "k1")
        store.close()
