# ruff: noqa: F811  (pytest fixtures imported from _delivery are parameters here)
"""Poison messages injected straight into the broker end in the DLQ; the worker goes on."""

from __future__ import annotations

import json
import uuid

import pytest
from kombu import Connection

from tests.integration._delivery import dead_letters, fast_policy, wait_dead, worker_env  # noqa: F401
from tests.support.procs import wait_until
from workers.installation import installation

pytestmark = pytest.mark.integration


def _inject(celery_app, broker, body, *, task: str, content_type: str = "application/json",
            encoding: str = "utf-8") -> str:
    """Publish a hand-made message on the email queue, as a broken producer would."""
    queue = next(q for q in installation(celery_app).topology.kombu_queues() if q.name == "email")
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0,
               "tidegate_priority": "HIGH"}
    with Connection(broker.url, connect_timeout=5,
                    transport_options=celery_app.conf.broker_transport_options) as conn:
        conn.Producer().publish(body, exchange=queue.exchange, routing_key="email",
                                declare=[queue], headers=headers, content_type=content_type,
                                content_encoding=encoding)
    return task_id


def test_three_kinds_of_poison_are_dead_lettered_and_the_worker_keeps_consuming(
        broker, sims, celery_app, producer, start_worker, worker_env):
    worker = start_worker("email", env=worker_env, concurrency=1)
    bad_body = _inject(celery_app, broker, b"\x80{not json", task="email.send",
                       encoding="binary")
    unknown = _inject(celery_app, broker, json.dumps([["a@x", "s"], {}, {}]),
                      task="email.nonexistent")
    misfit = _inject(celery_app, broker, json.dumps([[], {"to": "a@x", "colour": "red"}, {}]),
                     task="email.send")
    producer.enqueue("email.send", ["good@x", "after the poison"], idempotency_key="good-1")

    wait_until(lambda: sims["email"].ledger()["applied"] == 1, 30, message="the good task")
    records = {r.task_id: r for r in wait_dead(celery_app, "email", 3)}
    assert set(records) == {bad_body, unknown, misfit}
    assert records[bad_body].reason == "undecodable"
    assert records[bad_body].raw_body.startswith("base64:")
    assert records[unknown].reason == "unknown_task"
    assert "email.nonexistent" in records[unknown].exception_message
    assert records[misfit].reason == "invalid_arguments"
    assert records[misfit].kwargs == {"to": "a@x", "colour": "red"}
    assert all(r.queue == "email" and r.traceback for r in records.values())
    assert not any(r.replayable for r in records.values())
    assert worker.alive()
    assert sims["email"].ledger()["requests"] == 1  # no poison reached the dependency
    assert len(dead_letters(celery_app, "email")) == 3
