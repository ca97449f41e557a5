"""A single enqueue on RabbitMQ: the job waits for its confirm, its ``task-sent`` event does
not (``producers/sent_events.py``), and an event that cannot be published never fails the
job (before, ``send_task`` raised after the job was confirmed and the caller was told it was
refused)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from tests.conftest import STATE_REDIS_URL
from tidegate.stack import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def amqp_app(broker, policy_file: Path):
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file))
    yield app
    app.close()


def _listen(url: str) -> tuple[Connection, Queue]:
    conn = Connection(url, connect_timeout=5)
    queue = Queue("tidegate-test-sent-events", Exchange("celeryev", type="topic"),
                  routing_key="task.sent", auto_delete=True, durable=False)
    queue(conn.default_channel).declare()
    return conn, queue


def _queued_ids(url: str, queue: str) -> list[str]:
    ids = []
    with Connection(url, connect_timeout=5) as conn:
        while (msg := conn.default_channel.basic_get(queue, no_ack=True)) is not None:
            ids.append(msg.headers["id"])
    return ids


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_the_event_goes_out_on_a_channel_without_confirms(broker, amqp_app):
    from producers import Producer

    conn, queue = _listen(broker.url)
    try:
        producer = Producer(amqp_app, throttle=None)
        job = producer.enqueue("search.index", ["doc-1"], task_id="sent-1")
        assert job.id == "sent-1"
        events: list[dict] = []

        def got_event() -> bool:
            msg = conn.default_channel.basic_get(queue.name, no_ack=True)
            if msg is not None:
                events.append(json.loads(msg.body))
            return bool(events)

        wait_until(got_event, 10, message="the task-sent event")
        assert events[0]["type"] == "task-sent" and events[0]["uuid"] == "sent-1"
        assert events[0]["queue"] == "search" and events[0]["name"] == "search.index"
        line = producer._sent_events._line  # type: ignore[union-attr]
        assert line.conn is not None
        assert not line.conn.default_channel._confirm_selected  # the job's channel is
        assert _queued_ids(broker.url, "search") == ["sent-1"]
    finally:
        queue(conn.default_channel).delete()
        conn.close()


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_a_broken_events_connection_is_opened_again(broker, amqp_app):
    """The events connection's socket shut under it (a broker restart, an idle cut): the next
    event goes out on a fresh connection, nothing dropped."""
    from producers import Producer

    conn, queue = _listen(broker.url)
    try:
        producer = Producer(amqp_app, throttle=None)
        producer.enqueue("search.index", ["doc-a"], task_id="sent-a")
        line = producer._sent_events._line  # type: ignore[union-attr]
        first = line.conn
        first.connection.transport.sock.shutdown(socket.SHUT_RDWR)
        producer.enqueue("search.index", ["doc-b"], task_id="sent-b")
        assert line.conn is not first  # opened again
        uuids: list[str] = []

        def both() -> bool:
            while (msg := conn.default_channel.basic_get(queue.name, no_ack=True)) is not None:
                uuids.append(json.loads(msg.body)["uuid"])
            return len(uuids) >= 2

        wait_until(both, 10, message="both task-sent events")
        assert uuids == ["sent-a", "sent-b"]
        assert producer._sent_events.dropped == 0  # type: ignore[union-attr]
    finally:
        queue(conn.default_channel).delete()
        conn.close()


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_an_event_that_cannot_go_out_does_not_fail_its_job(broker, amqp_app, monkeypatch,
                                                           caplog):
    from producers import Producer
    from producers.sent_events import _Line

    def broken(self, app):
        raise ConnectionResetError("events connection reset")

    producer = Producer(amqp_app, throttle=None)
    monkeypatch.setattr(_Line, "producer", broken)
    with caplog.at_level(logging.WARNING, logger="producers.producer"):
        job = producer.enqueue("search.index", ["doc-2"], task_id="sent-2")
    assert job.id == "sent-2"  # queued, as the broker confirmed
    assert _queued_ids(broker.url, "search") == ["sent-2"]
    assert producer._sent_events.dropped == 1  # type: ignore[union-attr]
    assert "task-sent event for sent-2 not published (the job is queued)" in caplog.text


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_broker_without_confirms_keeps_celerys_own_dispatcher(broker, amqp_app):
    from producers import Producer

    assert Producer(amqp_app, throttle=None)._sent_events is None
