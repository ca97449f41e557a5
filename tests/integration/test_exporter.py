"""``tidegate exporter`` and ``tidegate depth --json`` against the truth on real brokers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from kombu import Exchange, Queue
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from resilience.breaker import CircuitBreaker
from resilience.policy import PolicyConfig
from resilience.shedding import Priority
from resilience.stores import RedisStore
from tests.conftest import STATE_REDIS_URL, tidegate_env
from tests.support.exporter import Exporter, policy_with_autoscaling, sample
from tests.support.procs import BIN, ROOT, wait_until
from workers.autoscale import ProcessingTimes
from workers.cluster_metrics import CounterMirror
from workers.topology import DLX_EXCHANGE, load_topology

pytestmark = pytest.mark.integration

EVERY_METRIC = {
    "tidegate_queue_up", "tidegate_queue_ready_messages", "tidegate_queue_in_flight_messages",
    "tidegate_queue_oldest_message_age_seconds", "tidegate_queue_backlog_messages",
    "tidegate_dead_letter_messages", "tidegate_desired_workers",
    "tidegate_target_backlog_per_worker_messages", "tidegate_task_processing_seconds",
    "tidegate_breaker_state", "tidegate_breaker_retry_after_seconds",
    "tidegate_breaker_state_known", "tidegate_cluster_sheds_total",
    "tidegate_cluster_rejections_total", "tidegate_cluster_retries_total",
    "tidegate_cluster_dead_letters_total", "tidegate_cluster_producer_refused_total",
    "tidegate_cluster_task_outcomes_total",
    "tidegate_exporter_snapshot_age_seconds",
}


def _publish_dead_letters(celery_app, queue: str, n: int) -> None:
    dlq_name = f"{queue}.dlq"
    dlx = Exchange(DLX_EXCHANGE, type="direct", durable=True)
    dlq = Queue(dlq_name, dlx, routing_key=dlq_name, durable=True)
    with celery_app.connection_for_write() as conn:
        producer = conn.Producer()
        for i in range(n):
            producer.publish({"dead": i}, exchange=dlx, routing_key=dlq_name, declare=[dlq],
                             serializer="json")


def _mirror_counters(state_redis) -> None:
    """Two processes' worth of counters, mirrored into the shared hash the exporter reads."""
    for sheds in (5, 2):  # each "process" has its own registry and its own mirror
        registry = CollectorRegistry()
        shed = Counter("tidegate_sheds", "x", ["priority"], registry=registry)
        rejected = Counter("tidegate_rejections", "x", ["dependency", "reason"],
                           registry=registry)
        retries = Counter("tidegate_retries", "x", ["dependency"], registry=registry)
        dead = Counter("tidegate_dead_letters", "x", ["queue"], registry=registry)
        refused = Counter("tidegate_producer_refused", "x", ["queue", "priority", "reason"],
                          registry=registry)
        mirror = CounterMirror(state_redis, registry=registry)
        shed.labels(priority="low").inc(sheds)
        rejected.labels(dependency="search", reason="rate_limited").inc(2)
        assert mirror.flush() == 2
        assert mirror.flush() == 0  # nothing new: nothing pushed twice
        retries.labels(dependency="email").inc(3)
        dead.labels(queue="payments").inc()
        refused.labels(queue="search", priority="low", reason="backpressure").inc(sheds)
        assert mirror.flush() == 3


def _depth_json(env: dict[str, str]) -> dict:
    out = subprocess.run([str(BIN / "tidegate"), "depth", "--json"], env={**os.environ, **env},
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_exporter_and_depth_cli_report_the_truth(broker, policy_file, celery_app, producer,
                                                 state_redis, tmp_path):
    policy = policy_with_autoscaling(policy_file, tmp_path)
    # The truth: 10 search tasks over every priority (Redis keeps them in 4 sub-lists),
    # 5 payments, 2 dead letters for payments, 3 search tasks taken and not acked.
    prios = [Priority.LOW] * 3 + [Priority.MEDIUM] * 2 + [Priority.HIGH] * 4 + [Priority.CRITICAL]
    for i, p in enumerate(prios):
        producer.enqueue("search.index", [f"doc-{i}"], priority=p)
    for i in range(5):
        producer.enqueue("payments.charge", [f"acct-{i}", 100], idempotency_key=f"k{i}",
                         priority="critical")
    _publish_dead_letters(celery_app, "payments", 2)
    times = ProcessingTimes(state_redis)
    times.observe("payments", 0.4)
    times.observe("payments", 0.6)  # mean 0.5 s -> 2 tasks/s, 2 s wait -> 4 per worker
    times.flush()  # what a worker's timer does within a second
    topology = load_topology(policy_file)
    cfg = PolicyConfig.from_mapping("payments", topology.dependency("payments").policy).breaker
    CircuitBreaker("payments", cfg, RedisStore(state_redis)).force_open(120)
    _mirror_counters(state_redis)

    env = tidegate_env(broker, policy)  # RabbitMQ: the management API gives in flight
    with celery_app.connection_for_read() as conn:
        channel = conn.channel()
        taken = [channel.basic_get("search", no_ack=False) for _ in range(3)]
        assert all(m is not None for m in taken)
        exporter = Exporter(env, tmp_path)
        try:
            def scraped():  # RabbitMQ's management figures lag by its stats interval (5 s)
                s = exporter.samples()
                ok = (sample(s, "tidegate_queue_ready_messages", queue="search") == 7
                      and sample(s, "tidegate_queue_in_flight_messages", queue="search") == 3)
                return s if ok else None

            s = wait_until(scraped, 45, interval=0.2,
                           message="search ready = 7 and in flight = 3 in a scrape")
            text = exporter.metrics_text()
            doc = _depth_json(env)
            status = exporter.http.get("/api/status").json()
        finally:
            exporter.stop()
        for m in taken:
            channel.basic_ack(m.delivery_tag)

    names = {f.name for f in text_string_to_metric_families(text)}
    names |= {f"{f.name}_total" for f in text_string_to_metric_families(text)
              if f.type == "counter"}
    assert names >= EVERY_METRIC, EVERY_METRIC - names

    def g(name: str, **labels: str) -> float | None:
        return sample(s, name, **labels)

    assert g("tidegate_queue_up", queue="search") == 1
    assert g("tidegate_queue_ready_messages", queue="payments") == 5
    assert g("tidegate_queue_ready_messages", queue="email") == 0
    assert g("tidegate_dead_letter_messages", queue="payments") == 2
    assert g("tidegate_dead_letter_messages", queue="search") == 0
    assert g("tidegate_queue_in_flight_messages", queue="search") == 3
    # backlog 7 + 3 = 10; 1 task/s per worker x 2 s = 2 per worker -> 5, clamped to 4.
    assert g("tidegate_queue_backlog_messages", queue="search") == 10
    assert g("tidegate_desired_workers", queue="search") == 4
    if broker.name == "redis":
        assert g("tidegate_queue_oldest_message_age_seconds", queue="payments") >= 0
    else:  # AMQP cannot peek at the oldest message; consumers come from the passive declare
        assert g("tidegate_queue_consumers", queue="search") == 0
    # payments: observed 0.5 s -> 4 per worker; ceil(5 / 4) = 2.
    assert g("tidegate_task_processing_seconds", queue="payments") == pytest.approx(0.5)
    assert g("tidegate_target_backlog_per_worker_messages", queue="payments") == 4
    assert g("tidegate_desired_workers", queue="payments") == 2
    assert g("tidegate_desired_workers", queue="email") == 0  # min 0: scale to zero
    assert g("tidegate_breaker_state", dependency="payments", queue="payments") == 2
    assert g("tidegate_breaker_retry_after_seconds", dependency="payments",
             queue="payments") > 60
    assert g("tidegate_breaker_state", dependency="search", queue="search") == 0
    assert g("tidegate_cluster_sheds_total", priority="low") == 7
    assert g("tidegate_cluster_sheds_total", priority="critical") == 0
    assert g("tidegate_cluster_rejections_total", dependency="search",
             reason="rate_limited") == 4
    assert g("tidegate_cluster_retries_total", dependency="email") == 6
    assert g("tidegate_cluster_dead_letters_total", queue="payments") == 2
    assert g("tidegate_cluster_producer_refused_total", queue="search", priority="low",
             reason="backpressure") == 7
    assert g("tidegate_cluster_producer_refused_total", queue="payments",
             priority="critical", reason="backpressure") == 0

    # `tidegate depth --json`: the same truth, in the documented shape.
    rows = {q["name"]: q for q in doc["queues"]}
    assert set(rows) == set(topology.work_queues)
    for q in rows.values():
        assert {"name", "ready", "in_flight", "oldest_age_s", "dead_letter", "deferred",
                "desired_workers"} <= set(q)
    assert (rows["search"]["ready"], rows["payments"]["ready"]) == (7, 5)
    assert rows["payments"]["dead_letter"] == 2
    assert rows["payments"]["desired_workers"] == 2
    assert rows["search"]["in_flight"] == 3
    assert rows["email"]["deferred"] is None  # SQS not configured here
    assert {b["dependency"]: b["state"] for b in doc["breakers"]}["payments"] == "open"
    assert status["breakers"][0]["state"] == "open"
    assert status["history"]["t"], "the sampler keeps history for the page"


def test_depth_cli_on_sqs_counts_in_flight_and_deferred(moto_sqs, policy_file, tmp_path,
                                                         monkeypatch, redis_up, state_redis):
    """SQS (moto): visible and in-flight figures, and the email queue's deferred requests."""
    import boto3

    from producers import Producer
    from resilience.fallback import DeferredRequest
    from workers.application import create_app
    from workers.deferral import sink_for
    from workers.settings import load_settings

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    url = f"sqs://testing:testing@127.0.0.1:{moto_sqs.port}/"
    prefix = f"t{tmp_path.name[-6:]}-"  # queues of this test only (moto is session-wide)
    settings = load_settings(broker_url=url, redis_url=STATE_REDIS_URL, policy_file=policy_file,
                             sqs_endpoint_url=moto_sqs.url, deferral_queue_prefix=prefix)
    app = create_app(settings)
    producer = Producer(app)
    sqs = boto3.client("sqs", endpoint_url=moto_sqs.url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    for name in ("search", "payments", "email", "default"):
        sqs.purge_queue(QueueUrl=sqs.create_queue(QueueName=name)["QueueUrl"])
    for i in range(4):
        producer.enqueue("search.index", [f"doc-{i}"])
    for i in range(2):
        producer.enqueue("payments.charge", [f"a{i}", 1], idempotency_key=f"sqs-depth-{i}")
    search_url = sqs.get_queue_url(QueueName="search")["QueueUrl"]
    got = sqs.receive_message(QueueUrl=search_url, MaxNumberOfMessages=1,
                              VisibilityTimeout=300)["Messages"]
    assert len(got) == 1
    sink = sink_for("email", settings)
    for i in range(3):
        sink.defer(DeferredRequest("email", "email.send", (f"u{i}@x", "s"),
                                   idempotency_key=f"d{i}"))
    app.close()

    env = {
        "TIDEGATE_BROKER_URL": url, "TIDEGATE_REDIS_URL": STATE_REDIS_URL,
        "TIDEGATE_POLICY_FILE": str(policy_file), "TIDEGATE_SQS_ENDPOINT_URL": moto_sqs.url,
        "TIDEGATE_DEFERRAL_QUEUE_PREFIX": prefix, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    rows = {q["name"]: q for q in _depth_json(env)["queues"]}
    assert (rows["search"]["ready"], rows["search"]["in_flight"]) == (3, 1)
    assert rows["search"]["source"] == "sqs"
    assert rows["payments"]["ready"] == 2
    assert rows["email"]["deferred"] == 3
    assert rows["search"]["deferred"] is None  # search's fallback is not queue-for-later
    assert rows["search"]["desired_workers"] == 1  # default policy: 120 per worker, min 1


def test_depth_cli_bad_broker_is_one_line_and_exit_3(policy_file, redis_up):
    env = {"TIDEGATE_BROKER_URL": "redis://127.0.0.1:1/0", "TIDEGATE_REDIS_URL": STATE_REDIS_URL,
           "TIDEGATE_POLICY_FILE": str(policy_file)}
    env = {**os.environ, **env}
    out = subprocess.run([str(BIN / "tidegate"), "depth", "--json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert out.stdout == ""
    assert out.stderr.startswith("tidegate: error: no queue depth could be read")
    assert out.stderr.count("\n") == 1
    bad = subprocess.run([str(BIN / "tidegate"), "depth"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**env, "TIDEGATE_BROKER_URL": "kafka://x"})
    assert bad.returncode == 2
    assert "TIDEGATE_BROKER_URL" in bad.stderr
