"""GET /v1/jobs/{id} and ``tidegate job ID``: a job's fate read back by its id, on both brokers,
from the state Tidegate keeps in Redis (no result backend)."""

# ruff: noqa: F811  (pytest fixtures imported from _delivery are parameters here)
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import STATE_REDIS_URL, sqs_env
from tests.integration._delivery import (  # noqa: F401  (fixtures)
    LIMITS,
    cli,
    dead_letters,
    fast_policy,
    force_breaker,
    wait_dead,
    worker_env,
)
from tests.support.exporter import Exporter
from tests.support.procs import BIN, wait_until

pytestmark = pytest.mark.integration

TOKEN = "job-status-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(broker, fast_policy, state_redis):
    from fastapi.testclient import TestClient

    from producers import Producer
    from producers.api import create_api
    from workers.application import create_app
    from workers.settings import load_settings

    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=fast_policy, api_tokens=TOKEN)
    app = create_app(settings)
    with TestClient(create_api(Producer(app, deferral=None))) as client:
        client.celery_app = app
        yield client
    app.close()


def status(api, job_id: str) -> dict:
    r = api.get(f"/v1/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def wait_state(api, job_id: str, state: str, timeout: float = 60) -> dict:
    try:
        return wait_until(lambda: (d := status(api, job_id))["state"] == state and d, timeout,
                          interval=0.2, message=f"job {job_id} {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {status(api, job_id)}") from None


def post(api, **job) -> str:
    r = api.post("/v1/jobs", json=job, headers=AUTH)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_job_status_follows_every_outcome(broker, api, sims, start_worker, worker_env,
                                          settings, fast_policy, moto_sqs, deferral_prefix,
                                          state_redis, tmp_path):
    assert api.get("/v1/jobs/nope", headers=AUTH).status_code == 404
    assert api.get("/v1/jobs/nope").status_code == 401
    assert "/v1/jobs/{job_id}" in api.get("/openapi.json").json()["paths"]

    sims["email"].control(mode="failing", error_rate=1.0, error_status=422)
    mail = post(api, task="email.send", args=["j@x", "hi"], idempotency_key="job-mail")
    doc = status(api, mail)
    assert (doc["state"], doc["task"], doc["queue"]) == ("queued", "email.send", "email")

    env = {**worker_env, **sqs_env(moto_sqs, deferral_prefix)}
    worker = start_worker("search,email", env=env)
    served = post(api, task="search.index", args=["doc-job"])
    poison = post(api, task="search.index", args=[], kwargs={"nope": 1})
    assert wait_state(api, served, "succeeded")["worker"] == worker.node
    dead = wait_state(api, mail, "dead_lettered")
    assert dead["reason"] == "permanent_failure" and dead["dlq"] == "email.dlq"
    assert "422" in dead["error"]
    bad = wait_state(api, poison, "dead_lettered")
    assert bad["reason"] == "invalid_arguments"

    # replayed from the DLQ while no worker runs: "replayed" until one takes it
    worker.stop()
    sims["email"].control(mode="healthy")
    [record] = wait_dead(api.celery_app, "email")
    assert record.id == dead["record"]
    replay = cli(broker, fast_policy, "dlq", "replay", "email", "--id", record.id)
    assert replay.returncode == 0, replay.stderr
    replayed = status(api, mail)
    assert (replayed["state"], replayed["record"]) == ("replayed", record.id)
    assert dead_letters(api.celery_app, "email") == []

    # queued for later by the worker (email's circuit open): the replayed job runs again and
    # moves on, and a new job too; each answers, and so does its SQS entry
    force_breaker(settings, fast_policy, "email", "open", seconds=600)
    start_worker("email", env=env)
    assert wait_state(api, mail, "deferred")["dependency"] == "email"
    later = post(api, task="email.send", args=["later@x", "hi"])
    deferred = wait_state(api, later, "deferred")
    assert deferred["dependency"] == "email" and deferred["deferred_id"]
    entry = status(api, deferred["deferred_id"])
    assert (entry["state"], entry["job"]) == ("deferred", later)

    # the exporter and the status page count these outcomes (the cluster counters they read)
    from workers.cluster_metrics import read_cluster_counters

    def outcomes() -> dict:
        rows = read_cluster_counters(state_redis).get("tidegate_cluster_task_outcomes", [])
        return {(lb["queue"], lb["outcome"]): v for lb, v in rows}

    expected = {("search", "succeeded"): 1, ("search", "dead_lettered"): 1,
                ("email", "dead_lettered"): 1, ("email", "deferred"): 2}  # mail, then later
    wait_until(lambda: {k: v for k, v in outcomes().items() if v} == expected, 30,
               interval=0.5, message=f"outcome counters (last: {outcomes()})")
    exporter = Exporter({"TIDEGATE_BROKER_URL": broker.url, "TIDEGATE_REDIS_URL": STATE_REDIS_URL,
                         "TIDEGATE_POLICY_FILE": str(fast_policy), **LIMITS}, tmp_path)
    try:
        page = exporter.http.get("/api/status").json()["outcomes"]
        scraped = exporter.samples()
    finally:
        exporter.stop()
    for (queue, outcome), count in expected.items():
        assert page[queue][outcome] == count
        assert scraped[("tidegate_cluster_task_outcomes_total",
                        (("outcome", outcome), ("queue", queue)))] == count

    env_cli = {**os.environ, "TIDEGATE_BROKER_URL": broker.url,
               "TIDEGATE_REDIS_URL": STATE_REDIS_URL, "TIDEGATE_POLICY_FILE": str(fast_policy),
               **LIMITS}
    shown = subprocess.run([str(BIN / "tidegate"), "job", mail, "--json"], capture_output=True,
                           text=True, timeout=60, env=env_cli)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "deferred"
    line = subprocess.run([str(BIN / "tidegate"), "job", served], capture_output=True,
                          text=True, timeout=60, env=env_cli)
    assert line.stdout.startswith("succeeded search.index on search"), line.stdout
    unknown = subprocess.run([str(BIN / "tidegate"), "job", "no-such-job"],
                             capture_output=True, text=True, timeout=60, env=env_cli)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_deferred_job_points_at_its_replay(broker, sims, policy_file, moto_sqs,
                                             deferral_prefix, start_worker, state_redis,
                                             tmp_path):
    """The replayer marks the deferred job (here the producer's: its id is the SQS entry's)
    replayed, with the replay's own id, whose status follows it to succeeded."""
    from resilience.fallback import CallContext, QueueForLater
    from tests.support.procs import Proc
    from workers.deferral import sink_for
    from workers.idempotency import ttl_from_env
    from workers.jobs import JobStatuses
    from workers.settings import load_settings

    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=policy_file, sqs_endpoint_url=moto_sqs.url,
                             aws_access_key_id="testing", aws_secret_access_key="testing",
                             deferral_queue_prefix=deferral_prefix)
    deferred = QueueForLater(sink_for("email", settings)).recover(
        CallContext("email", "email.send", ("r@x", "hi"), {}, idempotency_key="job-replay",
                    priority=2), RuntimeError("email is down"))
    jobs = JobStatuses(state_redis, ttl_from_env())
    jobs.write(deferred.id, "deferred", wait=True, task="email.send", queue="email",
               deferred_id=deferred.id, dependency="email")  # what the producer records

    env = {"TIDEGATE_BROKER_URL": broker.url, "TIDEGATE_REDIS_URL": STATE_REDIS_URL,
           "TIDEGATE_POLICY_FILE": str(policy_file), **sqs_env(moto_sqs, deferral_prefix)}
    start_worker("email", env=sqs_env(moto_sqs, deferral_prefix))
    replayer = Proc([str(BIN / "tidegate"), "replayer", "--dependency", "email"], env,
                    tmp_path / "replayer.log", "replayer")
    try:
        doc = wait_until(lambda: (d := jobs.read(deferred.id)) and d.get("replay")
                         and d["replay"]["state"] == "succeeded" and d, 120, interval=0.5,
                         message="the deferred job replayed and its replay succeeded")
    finally:
        replayer.stop()
    assert doc["state"] == "replayed" and doc["replay_id"] != deferred.id
    assert jobs.read(doc["replay_id"])["state"] == "succeeded"
    assert sims["email"].ledger()["applied"] == 1


def test_queued_is_written_in_the_publish_transaction_on_the_brokers_server(redis_up,
                                                                           state_redis):
    """Statuses on the Redis broker's own server: "queued" goes in the publish's MULTI/EXEC
    (no write of its own), for single and batch enqueues; on another server it does not."""
    import redis

    from producers import Job, Producer
    from tests.conftest import BROKER_DB, REDIS_BROKER_URL, STATE_DB
    from workers.application import create_app
    from workers.jobs import job_key
    from workers.settings import load_settings

    redis.Redis.from_url(REDIS_BROKER_URL).flushdb()
    app = create_app(load_settings(broker_url=REDIS_BROKER_URL, redis_url=STATE_REDIS_URL))
    try:
        producer = Producer(app, deferral=None)
        assert producer._status_dbs == (STATE_DB, BROKER_DB)
        one = producer.enqueue("search.index", ["d1"], priority="low")
        many = producer.enqueue_many([Job("search.index", [f"d{i}"]) for i in range(3)])
        for job_id in [one.id, *(r.id for r in many)]:
            doc = json.loads(state_redis.get(job_key(job_id)))
            assert (doc["state"], doc["queue"]) == ("queued", "search")
        assert producer.jobs._replies._lines == []  # the status line was never opened
        depth = producer.throttle.cache.probe.depth("search")
        assert depth.ready == 4
        # the same server under another name, or another server: written after the publish
        other = Producer(create_app(load_settings(
            broker_url=REDIS_BROKER_URL.replace("127.0.0.1", "localhost"),
            redis_url=STATE_REDIS_URL)), deferral=None)
        assert other._status_dbs is None
        other.app.close()
    finally:
        app.close()
