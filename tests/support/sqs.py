"""Celery on the SQS transport against the tests' moto server: the settings and the
payments worker that the SQS tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import STATE_REDIS_URL, Broker, tidegate_env
from tidegate.stack import Worker, wait_until
from workers.settings import Settings, load_settings


def sqs_settings(sqs_broker: Broker, moto_sqs: Any, policy_file: Path, prefix: str) -> Settings:
    """Settings on ``sqs_broker`` whose queues are named ``<prefix><queue>`` (the moto
    server is shared: a prefix per test keeps its queues its own)."""
    return load_settings(broker_url=sqs_broker.url, redis_url=STATE_REDIS_URL,
                         policy_file=policy_file, sqs_endpoint_url=moto_sqs.url,
                         sqs_queue_prefix=prefix)


def assert_charges_applied_once(sqs_broker: Broker, moto_sqs: Any, policy_file: Path,
                                prefix: str, tmp_path: Path, sims: Any,
                                keys: list[str]) -> None:
    """A real payments worker on SQS consumes the queued charges: each idempotency key in
    ``keys`` is applied, each with one request to the payments simulator."""
    env = tidegate_env(sqs_broker, policy_file, TIDEGATE_SQS_ENDPOINT_URL=moto_sqs.url,
                       TIDEGATE_SQS_QUEUE_PREFIX=prefix,
                       AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    worker = Worker("payments", env, tmp_path, concurrency=2).wait_ready(90)
    try:
        wait_until(lambda: sims["payments"].ledger()["applied"] == len(keys), 90,
                   interval=0.3, message=f"{len(keys)} charges consumed over SQS")
        effects = sims["payments"].ledger()["effects"]
        assert sorted(effects) == sorted(keys)
        assert all(e["requests"] == 1 for e in effects.values())
    finally:
        worker.stop()
