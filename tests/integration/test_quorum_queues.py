"""RabbitMQ quorum queues on one node: ``[queues.Q] queue_type = "quorum"`` in the policy file.

The shared RabbitMQ (127.0.0.1:5672), in a vhost of this slot's own (``tidegate_test_N_quorum``:
the slot's usual vhost already holds classic queues of the same names, and RabbitMQ refuses to
redeclare a queue with another type). A quorum queue works on a single node; the failover drill
on a three-node cluster is ``tests/drills/test_quorum_failover.py``.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest
from kombu import Connection, Exchange, Queue

from tests.conftest import SLOT, STATE_REDIS_URL, Broker
from tests.support.procs import wait_until
from tests.support.quorum import declared, quorum_policy

pytestmark = pytest.mark.integration
VHOST = f"tidegate_test_{SLOT}_quorum"
QUORUM = ("payments", "search")


@pytest.fixture
def quorum_broker(rabbitmq_up: str) -> Broker:
    existing = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True,
                              text=True, timeout=60).stdout.split()
    if VHOST not in existing:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", VHOST], check=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", VHOST, "guest", ".*",
                        ".*", ".*"], check=True, timeout=60)
    return Broker("amqp", f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")


@pytest.fixture
def quorum_app(quorum_broker, policy_file, tmp_path, state_redis):
    from workers.application import create_app
    from workers.installation import installation
    from workers.settings import load_settings

    policy = quorum_policy(policy_file, tmp_path / "quorum-policy.toml", QUORUM)
    app = create_app(load_settings(broker_url=quorum_broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy))
    topology = installation(app).topology
    with Connection(quorum_broker.url, connect_timeout=5) as conn:
        topology.declare(conn)
        channel = conn.channel()
        for q in topology.work_queues:
            channel.queue_purge(q)
            channel.queue_purge(topology.dead_letter_queue(q))
    yield app, policy
    app.close()


def test_declared_as_quorum_queues_without_priorities(quorum_app):
    from workers.installation import installation

    app, _ = quorum_app
    queues = declared(VHOST)
    for q in QUORUM:
        assert queues[q]["type"] == "quorum", queues[q]
        assert queues[f"{q}.dlq"]["type"] == "quorum", queues[f"{q}.dlq"]
        assert "x-max-priority" not in queues[q]["arguments"]
        assert "at-least-once" in queues[q]["arguments"]
    assert queues["email"]["type"] == "classic"
    assert "x-max-priority" in queues["email"]["arguments"]
    # Celery sees them: a worker of this app turns global QoS off (quorum queues refuse it)
    assert installation(app).topology.quorum
    assert app.conf.worker_detect_quorum_queues is True


def test_a_worker_serves_quorum_queues_and_dead_letters_into_them(
        quorum_app, quorum_broker, sims, start_worker_on):
    from producers import Producer
    from resilience.shedding import Priority
    from tests.support.load import dead_lettered

    app, policy = quorum_app
    worker = start_worker_on(quorum_broker)("payments,search", concurrency=2,
                                            env={"TIDEGATE_POLICY_FILE": str(policy)})
    assert "Global QoS is disabled" in worker.output()
    assert "delayed delivery" not in worker.output()  # Celery's step: no use on direct exchanges
    producer = Producer(app)
    run = uuid.uuid4().hex[:6]
    # a priority is accepted and ignored by the queue (admission sheds LOW first instead)
    producer.enqueue("search.index", [f"doc-{run}"], priority=Priority.LOW)
    producer.enqueue("payments.charge", [f"acct-{run}"], {"amount_cents": 100},
                     idempotency_key=f"k-{run}", priority=Priority.CRITICAL)
    wait_until(lambda: sims["search"].ledger()["applied"] == 1
               and sims["payments"].ledger()["applied"] == 1, 30, message="both jobs served")
    # an unkeyed charge that fails is not retried: Tidegate's own DLQ record, on a quorum DLQ
    sims["payments"].control(mode="failing")
    producer.enqueue("payments.charge", [f"fail-{run}"], {"amount_cents": 100})
    dead = wait_until(lambda: dead_lettered(app).get(f"fail-{run}"), 30,
                      message="the failed charge dead-lettered")
    assert dead == "transient_failure_not_idempotent"
    assert worker.alive()


def test_native_dead_lettering_is_at_least_once(quorum_app, quorum_broker):
    """A message rejected without requeue moves to the quorum DLQ (x-death), the broker
    keeping it until the DLQ confirmed it (``x-dead-letter-strategy = at-least-once``)."""
    from workers.installation import installation

    app, _ = quorum_app
    topology = installation(app).topology
    work = next(q for q in topology.kombu_queues() if q.name == "search")
    body = {"rejected": uuid.uuid4().hex}
    with Connection(quorum_broker.url, connect_timeout=5) as conn:
        conn.Producer().publish(body, exchange=work.exchange, routing_key="search",
                                serializer="json")
        got = []
        with conn.Consumer(work, callbacks=[lambda b, m: (got.append(b),
                                                          m.reject(requeue=False))],
                           accept=["json"]):
            conn.drain_events(timeout=10)
        dlq = Queue("search.dlq", Exchange("tidegate.dlx", type="direct"),
                    routing_key="search.dlq", queue_arguments={"x-queue-type": "quorum"})
        message = wait_until(lambda: dlq(conn.channel()).get(accept=["json"]), 10,
                             message="the rejected message in search.dlq")
        message.ack()
    assert got == [body] and message.payload == body
    assert message.headers["x-death"][0]["queue"] == "search"
