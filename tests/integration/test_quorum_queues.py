"""RabbitMQ quorum queues on one node: ``[queues.Q] queue_type = "quorum"`` in the policy file.

The shared RabbitMQ (127.0.0.1:5672), in a vhost of this slot's own (``tidegate_test_N_quorum``:
the slot's usual vhost already holds classic queues of the same names, and RabbitMQ refuses to
redeclare a queue with another type). A quorum queue works on a single node; the failover drill
on a three-node cluster is ``tests/drills/test_quorum_failover.py``.
"""

from __future__ import annotations

import uuid

import pytest
from kombu import Connection, Exchange, Queue

from tests.conftest import SLOT, STATE_REDIS_URL, Broker
from tests.support.procs import wait_until
from tests.support.quorum import declared, quorum_policy
from tidegate.stack import ensure_vhost

pytestmark = pytest.mark.integration
VHOST = f"tidegate_test_{SLOT}_quorum"
QUORUM = ("payments", "search", "email")  # "default" stays classic


@pytest.fixture
def quorum_broker(rabbitmq_up: str) -> Broker:
    ensure_vhost(VHOST)
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
    _retype(topology)
    with Connection(quorum_broker.url, connect_timeout=5) as conn:
        topology.declare(conn)
        channel = conn.channel()
        for q in topology.work_queues:
            channel.queue_purge(q)
            channel.queue_purge(topology.dead_letter_queue(q))
    yield app, policy
    app.close()


def _retype(topology) -> None:
    """Delete this vhost's queues declared with another type than ``topology`` wants (an
    earlier version of these tests declared them so): RabbitMQ would refuse the declaration."""
    found = declared(VHOST)
    stale = [q for w in topology.work_queues for q in (w, topology.dead_letter_queue(w))
             if q in found and found[q]["type"] != topology.queue_type(q)]
    if stale:
        with Connection(f"amqp://guest:guest@127.0.0.1:5672/{VHOST}", connect_timeout=5) as conn:
            for q in stale:
                conn.channel().queue_delete(q)


def test_declared_as_quorum_queues_without_priorities(quorum_app):
    from workers.installation import installation

    app, _ = quorum_app
    queues = declared(VHOST)
    for q in QUORUM:
        assert queues[q]["type"] == "quorum", queues[q]
        assert queues[f"{q}.dlq"]["type"] == "quorum", queues[f"{q}.dlq"]
        assert "x-max-priority" not in queues[q]["arguments"]
        assert "at-least-once" in queues[q]["arguments"]
    assert queues["default"]["type"] == "classic"
    assert "x-max-priority" in queues["default"]["arguments"]
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


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_a_countdown_holds_its_queue_on_quorum_queues(queue_type, quorum_broker, rabbitmq_up,
                                                      policy_file, sims, tmp_path,
                                                      start_worker_on, state_redis):
    """A broker retry (countdown) held by a worker of concurrency 1: on a quorum queue the
    consumer's prefetch is fixed, so the next job of that queue waits for the countdown (a
    job of another queue does not: each consumer has its own prefetch); on a classic queue
    Celery raises the prefetch and the next job runs at once (docs/ha.md, Celery settings)."""
    import re
    import time

    from producers import Producer
    from tests.support.load import job_of
    from workers.application import create_app
    from workers.installation import installation
    from workers.settings import load_settings

    # the shipped search policy: its first broker retry waits a few seconds (base_s = 1)
    policy = quorum_policy(policy_file, tmp_path / "p.toml", QUORUM, queue_type)
    broker = quorum_broker if queue_type == "quorum" else Broker("amqp", rabbitmq_up)
    app = create_app(load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy))
    run = uuid.uuid4().hex[:6]
    try:
        topology = installation(app).topology
        if queue_type == "quorum":
            _retype(topology)
        with Connection(broker.url, connect_timeout=5) as conn:
            topology.declare(conn)
            for q in ("search", "email"):
                conn.channel().queue_purge(q)
        worker = start_worker_on(broker)("search,email", concurrency=1,
                                         env={"TIDEGATE_POLICY_FILE": str(policy)})
        producer = Producer(app)
        sims["search"].control(mode="failing")
        producer.enqueue("search.index", [f"held-{run}"])
        line = wait_until(lambda: re.search(r"retry in ([\d.]+)s through the broker",
                                            worker.output()), 30, message="a broker retry")
        countdown, scheduled = float(line.group(1)), time.monotonic()
        sims["search"].control(mode="healthy")
        time.sleep(0.5)  # the retry published and received (held until due)
        sent = time.monotonic()
        producer.enqueue("email.send", ["a@x", "while a retry is held"],
                         idempotency_key=f"mail-{run}")
        producer.enqueue("search.index", [f"next-{run}"])
        waited = {}

        def done() -> bool:
            for name, sim in (("email", "email"), ("search", "search")):
                if name not in waited and any(
                        (a.get("payload") or {}).get("to") == "a@x" if name == "email"
                        else job_of(a) == f"next-{run}" for a in sims[sim].ledger()
                        ["applications"]):
                    waited[name] = time.monotonic() - sent
            return len(waited) == 2

        wait_until(done, 60, interval=0.05, message="the email and the next index job")
    finally:
        app.close()
    left = countdown - (sent - scheduled)
    print(f"\n{queue_type}: with a countdown of {countdown:.1f} s held ({left:.1f} s left), "
          f"the next search job waited {waited['search']:.2f} s, an email job "
          f"{waited['email']:.2f} s")
    assert waited["email"] < left  # another queue: its own consumer, its own prefetch
    if queue_type == "quorum":
        assert waited["search"] > left - 1.0  # held behind the countdown (no tight bound)
    else:
        assert waited["search"] < left
