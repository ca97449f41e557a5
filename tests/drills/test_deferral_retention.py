"""Drill: an outage longer than the SQS retention period loses no deferred request.

SQS drops a message ``MessageRetentionPeriod`` after it was sent (60 s here, SQS's minimum;
moto enforces it). A control queue without a replayer shows the drop is real; the replayer's
sweep stores the watched queue's entries again every ``retention - near margin`` (20 s)
while email is down, so all of them outlive the retention and are sent exactly once when
email is back. Takes about 90 s whatever ``TIDEGATE_DRILL_SCALE`` says.
"""

from __future__ import annotations

import time

import pytest

from resilience.fallback import DeferredRequest
from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL, sqs_env, tidegate_env
from tests.integration.test_replayer import _assert_exactly_once, _replayer, _stats
from tests.support.procs import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.drill,
              pytest.mark.parametrize("broker", ["redis"], indirect=True)]

RETENTION_S, NEAR_S = 60, 40  # a sweep every 20 s
N = 20


def _sink(policy_file, moto, prefix):
    from workers.deferral import sink_for
    from workers.settings import load_settings

    return sink_for("email", load_settings(
        broker_url=REDIS_BROKER_URL, redis_url=STATE_REDIS_URL, policy_file=policy_file,
        sqs_endpoint_url=moto.url, aws_access_key_id="testing",
        aws_secret_access_key="testing", deferral_queue_prefix=prefix,
        deferral_retention_s=RETENTION_S, deferral_near_retention_s=NEAR_S))


def test_outage_longer_than_retention_loses_no_deferred_request(
        broker, sims, policy_file, moto_sqs, deferral_prefix, start_worker, tmp_path,
        state_redis):
    sims["email"].control(mode="down")
    sink = _sink(policy_file, moto_sqs, deferral_prefix)
    control = _sink(policy_file, moto_sqs, deferral_prefix + "ctl-")
    addresses = [f"ret{i}@example.com" for i in range(N)]
    for i, to in enumerate(addresses):
        sink.defer(DeferredRequest("email", "email.send", (to, "hi"),
                                   idempotency_key=f"ret-{i}"))
    for i in range(5):
        control.defer(DeferredRequest("email", "email.send", (f"c{i}@x", "hi"),
                                      idempotency_key=f"ctl-{i}"))
    deferred_at = time.monotonic()
    assert sink.retention_s == RETENTION_S

    env = tidegate_env(broker, policy_file, **sqs_env(moto_sqs, deferral_prefix),
                       TIDEGATE_DEFERRAL_RETENTION_S=str(RETENTION_S),
                       TIDEGATE_DEFERRAL_NEAR_RETENTION_S=str(NEAR_S))
    replayer = _replayer(env, tmp_path, "replayer-retention")
    try:
        wait_until(lambda: "replayer email: down" in replayer.output(), 60,
                   message="replayer sees email down")
        # Past the retention of the first entries (and of the control's), email still down.
        wait_until(lambda: time.monotonic() - deferred_at > RETENTION_S + 15, 120,
                   interval=1.0, message="an outage longer than the retention")
        assert control.receive(10, visibility_timeout=5) == []  # SQS dropped those
        assert "entries stored again" in replayer.output()
        assert sink.stats().total == N  # these were kept alive

        sims["email"].control(mode="healthy")
        start_worker("email", concurrency=4, env=sqs_env(moto_sqs, deferral_prefix))
        wait_until(lambda: sims["email"].ledger()["applied"] == N, 120, interval=0.5,
                   message=f"{N} emails sent after the outage")
        wait_until(lambda: sink.stats().total == 0, 60, message="deferral queue empty")
    finally:
        stats = _stats(replayer)
    _assert_exactly_once(sims["email"], addresses)
    assert stats["refreshed"] >= 2 * N  # at least two sweeps during the outage
