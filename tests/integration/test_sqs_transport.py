"""The same app on Celery's SQS transport, against a moto server (a smoke test: moto is slow)."""

from __future__ import annotations

import boto3
import pytest

from tests.conftest import STATE_REDIS_URL, Broker
from tests.support.sqs import assert_charges_applied_once, sqs_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def sqs_broker(moto_sqs, redis_up) -> Broker:
    return Broker("sqs", f"sqs://testing:testing@127.0.0.1:{moto_sqs.port}/")


def test_payments_worker_on_sqs(sqs_broker, moto_sqs, sims, policy_file, tmp_path, monkeypatch,
                               state_redis):  # a clean idempotency store
    from producers import Producer
    from workers.application import create_app

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    prefix = f"t{tmp_path.name[-6:]}-"  # this test's queues only: the moto server is shared
    settings = sqs_settings(sqs_broker, moto_sqs, policy_file, prefix)
    app = create_app(settings)
    producer = Producer(app)
    for i in range(3):
        producer.enqueue("payments.charge", [f"acct-{i}", 100 + i], idempotency_key=f"sqs-{i}")
    producer.enqueue("search.index", ["doc-sqs"])

    try:
        assert_charges_applied_once(sqs_broker, moto_sqs, policy_file, prefix, tmp_path, sims,
                                    ["sqs-0", "sqs-1", "sqs-2"])
    finally:
        app.close()

    # `search` was never consumed: the message is still in its SQS queue, and the depth
    # probe finds it under the same prefix.
    from workers.depth import probe_for

    assert probe_for(settings).depth("search").ready == 1
    sqs = boto3.client("sqs", endpoint_url=moto_sqs.url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    url = sqs.get_queue_url(QueueName=f"{prefix}search")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]) == 1
    assert sims["search"].ledger()["requests"] == 0


def test_dlq_tooling_on_sqs_lists_without_duplicating_and_takes_once(
        sqs_broker, moto_sqs, policy_file, tmp_path, monkeypatch):
    """kombu's SQS channel re-publishes an unacked message as a copy when it closes; a
    listing must not, or every `tidegate dlq list` would double the DLQ."""
    from workers import deadletter as dl
    from workers.application import create_app
    from workers.settings import load_settings

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    prefix = f"d{tmp_path.name[-6:]}-"
    app = create_app(load_settings(broker_url=sqs_broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file, sqs_endpoint_url=moto_sqs.url,
                                   sqs_queue_prefix=prefix))
    dead = dl.DeadLetters(app)
    records = [dl.DeadLetter(reason=dl.PERMANENT, queue="payments", task="payments.charge",
                             task_id=f"t-{i}", args=[f"acct-{i}", 100], kwargs={}, headers={},
                             idempotency_key=None, idempotent=False, attempts=1, worker="w",
                             first_seen=1.0).with_error(RuntimeError(f"boom {i}"))
               for i in range(3)]
    for r in records:
        dead.publish(r)
    sqs = boto3.client("sqs", endpoint_url=moto_sqs.url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    url = sqs.get_queue_url(QueueName=f"{prefix}payments-dlq")["QueueUrl"]

    def stored() -> int:
        a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return (int(a["ApproximateNumberOfMessages"])
                + int(a["ApproximateNumberOfMessagesNotVisible"]))

    try:
        for _ in range(2):  # listed twice: the same three, still three stored, all visible
            listed = dead.list("payments")
            assert sorted(r.task_id for r in listed) == ["t-0", "t-1", "t-2"]
            assert {r.id for r in listed} == {r.id for r in records}
            assert stored() == 3
        assert dead.show("payments", records[1].id[:8]).exception_message == "boom 1"
        handled: list[str] = []
        taken = list(dead.take("payments", lambda r: r.task_id != "t-1",
                               lambda r: handled.append(r.task_id)))
        assert sorted(r.task_id for r in taken) == sorted(handled) == ["t-0", "t-2"]
        assert [r.task_id for r in dead.list("payments")] == ["t-1"]  # the rest, visible
        assert stored() == 1
    finally:
        app.close()
