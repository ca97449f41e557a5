"""A failed charge's job status says only what is known (payments' graceful fallback): "you
have not been charged" only when no attempt reached the provider, else "outcome unknown, we
will confirm", in GET /v1/jobs/{id} and ``tidegate job``; checked against the provider's
ledger. Real Redis broker, a real payments worker, the shipped policy file's messages."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import STATE_REDIS_URL
from tests.integration._delivery import LIMITS, cli, force_breaker
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

TOKEN = "honest-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOT_CHARGED = "Payments are temporarily unavailable; you have not been charged."
UNKNOWN = ("Payments did not answer in time; whether you were charged is not known yet. "
           "We will confirm.")


@pytest.fixture
def api(broker, policy_file, state_redis):
    from fastapi.testclient import TestClient

    from producers import Producer
    from producers.api import create_api
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file, api_tokens=TOKEN))
    with TestClient(create_api(Producer(app, deferral=None))) as client:
        client.celery_app = app
        yield client
    app.close()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_failed_charges_tell_only_what_is_known(broker, api, sims, policy_file, settings,
                                                start_worker, state_redis):
    app = api.celery_app

    def post(**job) -> str:
        r = api.post("/v1/jobs", json={"task": "payments.charge", "priority": "critical",
                                       **job}, headers=AUTH)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    seen: dict[str, dict] = {}

    def dead(job_id: str) -> dict:
        def check() -> dict | None:
            seen[job_id] = r = api.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
            return r if r.get("state") == "dead_lettered" else None

        try:  # a loaded machine: the worker may take a while; say what it showed last
            return wait_until(check, 60, interval=0.2, message=f"job {job_id} dead-lettered")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status {seen.get(job_id)}; payments ledger "
                                 f"{sims['payments'].ledger()}") from None

    # 1. its deadline passed before a worker took it: nothing ran, nothing charged
    late = post(args=["acct-late", 100], deadline_ms=300)
    time.sleep(0.5)
    start_worker("payments", env=LIMITS)
    doc = dead(late)
    assert (doc["reason"], doc["outcome"], doc["message"]) == (
        "deadline_expired", "not_attempted", NOT_CHARGED)

    # 2. the provider failed the unkeyed charge: it reached the provider, so not known
    sims["payments"].control(mode="failing", error_rate=1.0, error_status=500)
    failed = post(args=["acct-500", 200])
    doc = dead(failed)
    assert (doc["reason"], doc["outcome"], doc["message"]) == (
        "transient_failure_not_idempotent", "unknown", UNKNOWN)

    # 3. the last attempt of a keyed charge refused by the open circuit: "not charged" only
    # if no earlier delivery reached the provider (the retry carries tidegate_reached)
    sims["payments"].control(mode="healthy")
    force_breaker(settings, policy_file, "payments", "open", seconds=600)
    # The worker trusts its last merge with the shared state for the breaker's sync_interval
    # (0.25 s) before it reads it again: a charge sent sooner would see the circuit closed
    # (seen: both charges applied). Nothing to poll for: wait out twice that bound.
    from resilience.breaker import BreakerConfig

    time.sleep(2 * BreakerConfig().sync_interval)

    def last_attempt(key: str, reached: bool) -> str:
        headers = {"tidegate_idempotency_key": key, "tidegate_priority": "CRITICAL",
                   "tidegate_enqueued_at": time.time(), "tidegate_attempt": 4}
        if reached:
            headers["tidegate_reached"] = True
        return app.send_task("payments.charge", args=["acct-" + key, 300], queue="payments",
                             headers=headers, retry=False).id

    refused, after_reaching = last_attempt("k-refused", False), last_attempt("k-reached", True)
    for job_id, told in ((refused, ("not_attempted", NOT_CHARGED)),
                         (after_reaching, ("unknown", UNKNOWN))):
        doc = dead(job_id)
        assert doc["reason"] == "dependency_unavailable"
        assert (doc["outcome"], doc["message"]) == told

    # 4. a worker SIGKILLed between the DLQ record and the job status left "running"; the
    # redelivered duplicate is acked unrun and puts the status right: outcome unknown
    import uuid

    from workers.idempotency import IdempotencyStore
    from workers.jobs import JobStatuses

    orphan = str(uuid.uuid4())
    IdempotencyStore(state_redis, 3600).dead("payments.charge", f"task:{orphan}", "rec-1")
    JobStatuses(state_redis, 3600).write(orphan, "running", wait=True, task="payments.charge")
    app.send_task("payments.charge", args=["acct-orphan", 400], queue="payments",
                  task_id=orphan, headers={"tidegate_priority": "CRITICAL"}, retry=False)
    doc = dead(orphan)
    assert (doc["record"], doc["outcome"], doc["message"]) == ("rec-1", "unknown", UNKNOWN)

    # nobody told "not charged" was charged; the provider never applied a charge here
    assert sims["payments"].ledger()["effects"] == {}
    shown = cli(broker, policy_file, "job", after_reaching, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["message"] == UNKNOWN
