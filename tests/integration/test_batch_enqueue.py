"""Batch enqueue at broker speed (producers/batch.py) against real Redis and RabbitMQ.

Each test checks what the broker holds, not just what the producer says: a job reported
queued is on its queue (and consumed once), a job reported failed is not.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest
import redis

from resilience.errors import Backpressure
from tests.conftest import BROKER_DB, REDIS_BROKER_URL, REDIS_PORT, STATE_REDIS_URL, VHOST
from tests.support.procs import wait_until
from workers import headers as h
from workers.errors import BrokerUnavailable, InvalidPayload, UnknownTask
from workers.topology import redis_priority_lists

pytestmark = pytest.mark.integration

LOW, HIGH = 20, 40  # the search queue's watermarks in these tests


@pytest.fixture
def bp_app(broker, policy_file: Path, tmp_path: Path):
    from workers.application import create_app
    from workers.settings import load_settings

    path = tmp_path / "policy-batch.toml"
    path.write_text(policy_file.read_text() + f"""
[backpressure.search]
low_watermark = {LOW}
high_watermark = {HIGH}
max_wait_ms = 200
""")
    app = create_app(load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=path))
    yield app
    app.close()


def _depth(broker, queue: str) -> int:
    if broker.name == "redis":
        client = redis.Redis.from_url(REDIS_BROKER_URL)
        return sum(client.llen(k) for k in redis_priority_lists(queue))
    from kombu import Connection

    with Connection(broker.url, connect_timeout=5) as conn:
        return conn.default_channel.queue_declare(queue, passive=True).message_count


def _queued(results) -> list[int]:
    return [i for i, r in enumerate(results) if getattr(r, "state", None) == "queued"]


def test_mixed_priority_batch_is_consumed_once_each_and_counted(broker, bp_app, sims,
                                                                 start_worker):
    from producers import Job, Producer

    producer = Producer(bp_app, throttle=None)
    producer_with_depth = Producer(bp_app)
    prios = ["critical", "high", "medium", "low"]
    jobs = [Job("search.index", [f"doc-{i}"], priority=prios[i % 4]) for i in range(60)]
    before = producer_with_depth.throttle.cache._published_here.get("search", 0)
    results = producer_with_depth.enqueue_many(jobs[:10]) + producer.enqueue_many(jobs[10:])
    assert _queued(results) == list(range(60)), results
    assert [r.priority.name.lower() for r in results] == [prios[i % 4] for i in range(60)]
    assert len({r.id for r in results}) == 60
    # depth accounting: the throttle counted exactly the batch it published
    assert producer_with_depth.throttle.cache._published_here["search"] - before == 10
    assert _depth(broker, "search") == 60
    start_worker("search", concurrency=4)
    wait_until(lambda: sims["search"].ledger()["applied"] == 60, 90,
               message="60 documents indexed")
    effects = sims["search"].ledger()["effects"]
    assert sorted(effects) == sorted(f"index:doc-{i}" for i in range(60))
    assert {e["requests"] for e in effects.values()} == {1}  # each consumed exactly once
    wait_until(lambda: _depth(broker, "search") == 0, 20, message="search queue empty")


def test_batch_messages_are_what_send_task_publishes(broker, bp_app, state_redis):
    """The same job through the single path (``app.send_task``) and through a batch."""
    from kombu import Connection

    from producers import Job, Producer

    producer = Producer(bp_app, throttle=None)
    producer.enqueue("search.index", ["same"], {"body": {"k": 1}}, priority="medium",
                     task_id="t-single", idempotency_key="key")
    [result] = producer.enqueue_many([Job("search.index", ["same"], {"body": {"k": 1}},
                                          priority="medium", task_id="t-batch",
                                          idempotency_key="key")])
    assert result.state == "queued"

    def normal(headers: dict, props: dict) -> tuple:
        headers = {k: v for k, v in headers.items() if k != h.ENQUEUED_AT}
        for key in ("id", "root_id"):
            assert headers[key] in ("t-single", "t-batch")
            headers[key] = "ID"
        props = {k: v for k, v in props.items() if k not in ("delivery_tag", "correlation_id")}
        return headers, props

    if broker.name == "redis":
        client = redis.Redis.from_url(REDIS_BROKER_URL)
        raw = [json.loads(m) for k in redis_priority_lists("search")
               for m in client.lrange(k, 0, -1)]
        assert len(raw) == 2
        shapes = [(m["body"], m["content-type"], m["content-encoding"],
                   *normal(m["headers"], m["properties"])) for m in raw]
    else:
        shapes = []
        with Connection(broker.url, connect_timeout=5) as conn:
            for _ in range(2):
                msg = conn.default_channel.basic_get("search", no_ack=True)
                props = dict(msg.properties)
                headers = props.pop("application_headers")
                shapes.append((msg.body, msg.content_type, msg.content_encoding,
                               *normal(headers, props)))
    assert shapes[0] == shapes[1]


def _events(broker):
    """Start listening to ``task-sent`` events; the returned function reads them as
    (the event, the rest of its message without the body or delivery tag)."""
    if broker.name == "redis":  # redis-cli: one line per field, a message's JSON on one
        sub = subprocess.Popen(["redis-cli", "-p", str(REDIS_PORT), "psubscribe",
                                f"/{BROKER_DB}.celeryev/task.sent"],
                               stdout=subprocess.PIPE, text=True)
        assert sub.stdout is not None
        ack = [sub.stdout.readline().strip() for _ in range(3)]
        assert ack[0] == "psubscribe", ack

        def read_redis() -> list[tuple[dict, str]]:
            time.sleep(1.0)  # published already; let redis-cli print them
            sub.terminate()
            lines = sub.communicate(timeout=10)[0].splitlines()
            out = []
            for i in range(0, len(lines) - 3, 4):
                assert lines[i] == "pmessage", lines[i:i + 4]
                message = json.loads(lines[i + 3])
                event = json.loads(base64.b64decode(message.pop("body")))
                message["properties"].pop("delivery_tag")
                out.append((event, json.dumps(message)))
            return out
        return read_redis
    from kombu import Connection, Exchange, Queue

    conn = Connection(broker.url, connect_timeout=5)
    queue = Queue("tidegate-test-events", Exchange("celeryev", type="topic"),
                  routing_key="task.#", auto_delete=True, durable=False)
    queue(conn.default_channel).declare()

    multi: list[bool] = []

    def read_amqp() -> list[tuple[dict, str]]:
        out = []
        while (msg := conn.default_channel.basic_get(queue.name, no_ack=True)) is not None:
            body = json.loads(msg.body)
            key = msg.delivery_info["routing_key"]
            # a batch's events come as one list routed task.multi (Celery's own form)
            for event in body if isinstance(body, list) else [body]:
                if event.get("type") == "task-sent":
                    multi.append(key == "task.multi")
                    out.append((event, json.dumps([msg.headers, sorted(msg.properties)])))
        queue(conn.default_channel).delete()
        conn.close()
        assert multi == [False] * 3 + [True] * 3  # single: one each; the batch's: one list
        return out
    return read_amqp


def test_every_job_of_a_batch_is_the_message_celery_builds(broker, bp_app, state_redis):
    """A batch builds its messages from a template (producers/messages.py): every job of it,
    not only the one Celery built, must be what ``send_task`` publishes for that job, in the
    same key order, and so must its ``task-sent`` event."""
    from kombu import Connection

    from producers import Job, Producer

    jobs = [Job("search.index", ["a", 1.5, [1, [2]]], {"body": {"k": "é"}}, priority="critical",
                idempotency_key="key-a"),
            Job("search.index", ["b"], priority="low", deadline_s=30),
            Job("search.index", [], {"n": None, "t": True}, priority="medium")]
    producer = Producer(bp_app, throttle=None)
    read_events = _events(broker)
    for i, job in enumerate(jobs):
        producer.enqueue(job.task, job.args, job.kwargs, priority=job.priority,
                         idempotency_key=job.idempotency_key, deadline_s=job.deadline_s,
                         task_id=f"single-{i}")
    built = []
    send_task = bp_app.send_task
    bp_app.send_task = lambda *a, **kw: built.append(a[0]) or send_task(*a, **kw)
    try:
        results = producer.enqueue_many([Job(j.task, j.args, j.kwargs, j.priority,
                                             j.idempotency_key, None, j.deadline_s,
                                             f"batch-{i}") for i, j in enumerate(jobs)])
    finally:
        del bp_app.send_task
    assert _queued(results) == [0, 1, 2]
    assert built == ["search.index"]  # Celery built one message (the template), not three

    def normal(headers: dict, props: dict) -> tuple:
        headers = dict(headers, **{h.ENQUEUED_AT: 0})
        if h.DEADLINE in headers:
            headers[h.DEADLINE] = 0
        props = {k: v for k, v in props.items() if k != "delivery_tag"}
        return json.dumps(headers), json.dumps(props)  # key order counts too

    def shape(message_id: str, text: str) -> str:
        return text.replace(message_id, "ID")

    if broker.name == "redis":
        client = redis.Redis.from_url(REDIS_BROKER_URL)
        raw = [json.loads(m) for k in redis_priority_lists("search")
               for m in client.lrange(k, 0, -1)]
        messages = {m["headers"]["id"]: m for m in raw}
        # one token per message, the batch's rung at once (RING_MANY)
        assert client.llen("_tidegate.signal.search") == 6
        got = {tid: shape(tid, json.dumps([list(m), m["body"], m["content-type"],
                                            m["content-encoding"],
                                            *normal(m["headers"], m["properties"])]))
               for tid, m in messages.items()}
    else:
        got = {}
        with Connection(broker.url, connect_timeout=5) as conn:
            while (msg := conn.default_channel.basic_get("search", no_ack=True)) is not None:
                props = dict(msg.properties)
                headers = props.pop("application_headers")
                got[headers["id"]] = shape(headers["id"], json.dumps([
                    str(msg.body), msg.content_type, msg.content_encoding,
                    *normal(headers, props)]))
    assert len(got) == 6
    for i in range(3):
        assert got[f"batch-{i}"] == got[f"single-{i}"], i

    events = read_events()

    def event_shape(event: dict, rest: str) -> tuple[str, str]:
        uuid = event["uuid"]
        return uuid, shape(uuid, json.dumps(dict(event, clock=0, timestamp=0)) + rest)

    sent = dict(event_shape(*e) for e in events)
    assert len(sent) == 6, events
    for i in range(3):
        assert sent[f"batch-{i}"] == sent[f"single-{i}"], i


def test_half_accepted_batch_says_which_jobs_are_in(broker, bp_app, state_redis):
    """Bad jobs and jobs the depth throttle refuses hold their errors; the rest are queued,
    and the broker holds exactly those. The throttle counts the batch's own jobs."""
    from producers import Job, Producer

    producer = Producer(bp_app)
    jobs = [Job("search.index", [f"low-{i}"], priority="low") for i in range(40)]
    jobs[3] = Job("search.index", ["x" * (producer.max_message_bytes + 1)])
    jobs[7] = Job("nope.task")
    jobs += [Job("search.index", [f"vip-{i}"], priority="critical") for i in range(3)]
    results = producer.enqueue_many(jobs)
    assert isinstance(results[3], InvalidPayload)
    assert isinstance(results[7], UnknownTask)
    queued = _queued(results)
    # LOW is admitted for sure below the low watermark, never from low + span/2: the batch's
    # own admitted jobs count as queued
    assert set(range(LOW + 2)) - {3, 7} <= set(queued)
    assert LOW <= len([i for i in queued if i < 40]) <= LOW + (HIGH - LOW) // 2
    assert {40, 41, 42} <= set(queued)  # CRITICAL is never shed
    refused = [i for i in range(40) if i not in queued and i not in (3, 7)]
    assert refused and all(isinstance(results[i], Backpressure) for i in refused)
    assert _depth(broker, "search") == len(queued)
    # job status: each queued job reads "queued"; a refused one has none
    wait_until(lambda: all((producer.jobs.read(results[i].id) or {}).get("state") == "queued"
                           for i in queued), 10, message="a queued status per queued job")


def test_redis_refusing_one_priority_list_fails_exactly_those_jobs(broker, bp_app,
                                                                   state_redis):
    if broker.name != "redis":
        pytest.skip("a Redis command refused inside the batch's transaction")
    from producers import Job, Producer

    producer = Producer(bp_app, throttle=None)
    client = redis.Redis.from_url(REDIS_BROKER_URL)
    assert producer.enqueue("search.index", ["probe"], priority="low").state == "queued"
    [low_list] = [k for k in redis_priority_lists("search") if client.llen(k)]
    client.delete(low_list)
    client.set(low_list, "not a list")  # every LPUSH of a LOW job now fails (WRONGTYPE)
    prios = ["high", "low", "critical", "low", "medium"]
    results = producer.enqueue_many([Job("search.index", [f"d{i}"], priority=p)
                                     for i, p in enumerate(prios)])
    assert _queued(results) == [0, 2, 4]
    assert all(isinstance(results[i], BrokerUnavailable) and "WRONGTYPE" in str(results[i])
               for i in (1, 3))
    client.delete(low_list)
    assert _depth(broker, "search") == 3


@pytest.fixture
def search_capped():
    """A RabbitMQ policy that lets the search queue hold 3 messages and nacks the rest."""
    name = "tidegate-test-cap"
    subprocess.run(["rabbitmqctl", "-q", "set_policy", "-p", VHOST, "--apply-to", "queues",
                    "--priority", "100", name, "^search$",
                    '{"max-length": 3, "overflow": "reject-publish"}'], check=True, timeout=60)
    yield
    subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", VHOST, name], check=True,
                   timeout=60)
    # the next test's search queue must not be capped still
    wait_until(lambda: not _policy_applied(), 30, message="the cap policy gone")


def test_rabbitmq_nacks_are_mapped_to_their_jobs(broker, bp_app, state_redis, request):
    if broker.name != "amqp":
        pytest.skip("publisher confirms are RabbitMQ's")
    request.getfixturevalue("search_capped")
    from producers import Job, Producer

    producer = Producer(bp_app, throttle=None)
    wait_until(lambda: _policy_applied(), 20, message="the cap policy on the search queue")
    results = producer.enqueue_many([Job("search.index", [f"d{i}"]) for i in range(5)]
                                    + [Job("email.send", ["a@x", "s", "b"])])
    assert _queued(results) == [0, 1, 2, 5], results
    assert all(isinstance(results[i], BrokerUnavailable) and "nack" in str(results[i])
               for i in (3, 4))
    assert _depth(broker, "search") == 3


def _policy_applied() -> bool:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", VHOST, "name", "policy"],
                         capture_output=True, text=True, timeout=60).stdout
    return any(line.split()[:2] == ["search", "tidegate-test-cap"] for line in
               out.splitlines())


def test_rabbitmq_queue_deleted_behind_kombus_back_is_redeclared_in_a_batch(broker, bp_app,
                                                                           state_redis):
    if broker.name != "amqp":
        pytest.skip("unroutable returns are RabbitMQ's")
    from kombu import Connection

    from producers import Job, Producer

    producer = Producer(bp_app, throttle=None)
    assert producer.enqueue_many([Job("email.send", ["a@x", "s", "b"])])[0].state == "queued"
    with Connection(broker.url, connect_timeout=5) as conn:
        conn.default_channel.queue_delete("email")
    results = producer.enqueue_many([Job("email.send", [f"{i}@x", "s", "b"])
                                     for i in range(4)])
    assert _queued(results) == [0, 1, 2, 3], results
    assert _depth(broker, "email") == 4


def test_async_batch_publishes_once_and_reports_each_job(broker, bp_app, state_redis):
    import asyncio

    from producers import AsyncProducer, Job, Producer

    ap = AsyncProducer(Producer(bp_app))
    jobs = [Job("search.index", [f"a{i}"], priority="high") for i in range(6)]
    jobs[4] = Job("search.index", [float("nan")])
    results = asyncio.run(ap.enqueue_many(jobs))
    assert _queued(results) == [0, 1, 2, 3, 5]
    assert isinstance(results[4], InvalidPayload)
    assert _depth(broker, "search") == 5


def test_rabbitmq_batch_frames_are_what_py_amqp_writes(broker, bp_app, state_redis,
                                                       monkeypatch):
    """Every frame of a batch (each job's message, then its events) checked against py-amqp's
    own encoding of the same message, not only the first one of the batch."""
    if broker.name != "amqp":
        pytest.skip("AMQP frames")
    from producers import Job, Producer
    from producers.batch import AmqpConfirms

    checked: list[bool] = []
    encode = AmqpConfirms._encode

    def check_every(self, msg, *route):
        self._verify = True  # compare this message too (else: the batch's first only)
        frames = encode(self, msg, *route)
        checked.append(frames is not None and self._frames is not None)
        return frames

    monkeypatch.setattr(AmqpConfirms, "_encode", check_every)
    producer = Producer(bp_app, throttle=None)
    jobs = [Job("search.index", [f"d{i}", i, i / 3], {"é": "it's"} if i % 3 else None,
                priority=["critical", "high", "medium", "low"][i % 4],
                idempotency_key=f"k{i}" if i % 2 else None, deadline_s=30 if i % 5 else None)
            for i in range(40)]
    jobs += [Job("email.send", [f"{i}@x", "s", "b" * 300]) for i in range(5)]
    results = producer.enqueue_many(jobs)
    assert _queued(results) == list(range(45)), results
    assert checked == [True] * (45 + 1)  # and the batch's one message of task-sent events


@pytest.mark.parametrize("size,at", [(10, 5), (150, 120)])
def test_rabbitmq_connection_lost_mid_batch_never_reports_an_unconfirmed_job(
        broker, bp_app, state_redis, size, at):
    """The socket dies while the batch is being written (before any of its frames went out,
    or after some of its writes did): no job is reported queued unless the broker holds it,
    and the jobs after the break say they were not confirmed."""
    if broker.name != "amqp":
        pytest.skip("publisher confirms are RabbitMQ's")
    import socket

    from kombu import Connection

    from producers import Job, Producer

    def cut(p, producer) -> None:
        if p.args == [f"d{at}"]:
            producer.channel.connection._transport.sock.shutdown(socket.SHUT_RDWR)

    class CutMidBatch(Producer):  # either way a job is built: send_task, or its template
        def _send(self, p, producer):
            cut(p, producer)
            super()._send(p, producer)

        def _send_templated(self, template, p, events, producer):
            cut(p, producer)
            super()._send_templated(template, p, events, producer)

    producer = CutMidBatch(bp_app, throttle=None)
    producer.enqueue_many([Job("search.index", ["warm"])])  # the confirm channel exists
    with Connection(broker.url, connect_timeout=5) as conn:
        conn.default_channel.queue_purge("search")
    results = producer.enqueue_many([Job("search.index", [f"d{i}"]) for i in range(size)])
    queued = set(_queued(results))
    assert not queued & set(range(at, size))
    assert all(isinstance(results[i], BrokerUnavailable) for i in range(size) if i not in queued)
    assert all("confirm" in str(results[i]) or "unreachable" in str(results[i])
               for i in range(size) if i not in queued)
    held = []
    with Connection(broker.url, connect_timeout=5) as conn:
        while (msg := conn.default_channel.basic_get("search", no_ack=True)) is not None:
            held.append(msg.headers["argsrepr"])
    held_jobs = {int(a.strip("[]'\"")[1:]) for a in held}
    assert queued <= held_jobs <= set(range(at))  # reported queued => held; none after the cut
    if size > 100:  # frames are written in chunks: the first ones reached the broker
        assert held_jobs
    # and the producer recovers (its broker gate re-probes): a later batch is published
    wait_until(lambda: _queued(producer.enqueue_many([Job("search.index", ["after"])])) == [0],
               20, message="a batch published after the cut")


def test_sqs_batch_sends_in_tens_and_a_worker_consumes_each_once(
        moto_sqs, redis_up, sims, policy_file, tmp_path, monkeypatch, state_redis):
    from producers import Job, Producer
    from tests.conftest import Broker
    from tests.support.sqs import assert_charges_applied_once, sqs_settings
    from workers.application import create_app
    from workers.depth import probe_for

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    sqs_broker = Broker("sqs", f"sqs://testing:testing@127.0.0.1:{moto_sqs.port}/")
    prefix = f"b{tmp_path.name[-6:]}-"  # this test's queues only: the moto server is shared
    settings = sqs_settings(sqs_broker, moto_sqs, policy_file, prefix)
    app = create_app(settings)
    producer = Producer(app)
    calls = []
    jobs = [Job("search.index", [f"doc-{i}"]) for i in range(21)]
    jobs += [Job("payments.charge", [f"acct-{i}", 100 + i], idempotency_key=f"sqsb-{i}")
             for i in range(3)]
    jobs.insert(5, Job("payments.charge", [float("nan")]))
    import botocore.client

    original = botocore.client.BaseClient._make_api_call

    def spy(self, operation, params):
        calls.append((operation, len(params.get("Entries", []))))
        return original(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", spy)
    results = producer.enqueue_many(jobs)
    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", original)
    assert _queued(results) == [i for i in range(25) if i != 5]
    assert isinstance(results[5], InvalidPayload)
    sends = [c for c in calls if c[0].startswith("SendMessage")]
    assert sorted(sends) == sorted([("SendMessageBatch", 10), ("SendMessageBatch", 10),
                                    ("SendMessageBatch", 1), ("SendMessageBatch", 3)])
    wait_until(lambda: probe_for(settings).depth("search").ready == 21, 20,
               message="21 messages in the search queue")
    try:
        assert_charges_applied_once(sqs_broker, moto_sqs, policy_file, prefix, tmp_path, sims,
                                    ["sqsb-0", "sqsb-1", "sqsb-2"])
    finally:
        app.close()
