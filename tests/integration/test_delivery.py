# ruff: noqa: F811  (pytest fixtures imported from _delivery are parameters here)
"""The delivery-semantics table of docs/architecture.md, row by row, on Redis and RabbitMQ.

Each test runs a real ``celery -A workers worker`` against the downstream simulators and
checks the simulator's ledger (effects and attempts per idempotency key) and the DLQ.
"""

from __future__ import annotations

import pytest

from tests.integration._delivery import (  # noqa: F401  (fixtures)
    dead_letters,
    fast_policy,
    force_breaker,
    marks,
    wait_dead,
    worker_env,
)
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration


def test_idempotent_transient_failure_is_retried_until_it_succeeds(
        broker, sims, producer, start_worker, worker_env, celery_app, state_redis):
    sims["email"].control(mode="failing", error_rate=1.0)
    start_worker("email", env=worker_env)
    producer.enqueue("email.send", ["a@x", "hi"], idempotency_key="mail-1")
    # at least two failed attempts: the in-process retry and one through the broker
    wait_until(lambda: sims["email"].ledger()["failed_attempts"].get("mail-1", 0) >= 2, 30,
               message="two failed attempts")
    sims["email"].control(mode="healthy")
    ledger = wait_until(lambda: (lg := sims["email"].ledger())["applied"] == 1 and lg, 30,
                        message="the email sent once")
    assert ledger["effects"]["mail-1"]["requests"] == 1
    wait_until(lambda: marks(state_redis, "email.send").get("key:mail-1", {}).get("s") == "done",
               10, message="done mark")
    assert dead_letters(celery_app, "email") == []


def test_idempotent_retries_exhausted_go_to_the_dlq(
        broker, sims, producer, start_worker, worker_env, celery_app):
    sims["search"].control(mode="down")
    start_worker("search", env=worker_env)
    job = producer.enqueue("search.index", ["doc-9"], {"body": {"t": 1}})
    [record] = wait_dead(celery_app, "search")
    assert record.reason == "retries_exhausted"
    assert record.attempts == 4  # the seed's maximum
    assert (record.task, record.task_id, record.queue) == ("search.index", job.id, "search")
    assert record.args == ["doc-9"] and record.kwargs == {"body": {"t": 1}}
    assert record.exception_type in ("RetriesExhausted", "DeadlineExceeded", "DownstreamError")
    assert "Traceback" in record.traceback and record.worker.startswith("search-")
    assert record.first_seen <= record.dead_lettered_at
    assert sims["search"].ledger()["applied"] == 0


def test_non_idempotent_failure_is_dead_lettered_not_retried(
        broker, sims, producer, start_worker, worker_env, celery_app, state_redis):
    # The provider applies the charge, then answers 503: retrying would charge twice.
    sims["payments"].control(mode="failing", error_rate=1.0, apply_then_fail=True)
    start_worker("payments", env=worker_env)
    job = producer.enqueue("payments.charge", ["acct-1", 500], priority="critical")
    [record] = wait_dead(celery_app, "payments")
    assert record.reason == "transient_failure_not_idempotent"
    assert record.attempts == 1 and record.idempotent is False and record.needs_force
    ledger = sims["payments"].ledger()
    assert ledger["effects"][job.id]["requests"] == 1  # called exactly once
    assert ledger["requests"] == 1
    assert marks(state_redis, "payments.charge")[f"task:{job.id}"]["s"] == "dead"


def test_non_idempotent_with_key_is_retried_and_charged_once(
        broker, sims, producer, start_worker, worker_env, celery_app):
    sims["payments"].control(mode="failing", error_rate=1.0, apply_then_fail=True)
    start_worker("payments", env=worker_env)
    producer.enqueue("payments.charge", ["acct-2", 700], idempotency_key="order-7")
    wait_until(lambda: sims["payments"].ledger()["requests"] >= 2, 30,
               message="a retry of the keyed charge")
    sims["payments"].control(mode="healthy")
    wait_until(lambda: sims["payments"].ledger()["duplicates"] >= 1, 30,
               message="the retry answered as a duplicate")
    ledger = sims["payments"].ledger()
    assert ledger["applied"] == 1 and list(ledger["effects"]) == ["order-7"]
    assert dead_letters(celery_app, "payments") == []


def test_permanent_failure_is_dead_lettered_at_once(
        broker, sims, producer, start_worker, worker_env, celery_app):
    sims["email"].control(mode="failing", error_rate=1.0, error_status=422)
    start_worker("email", env=worker_env)
    producer.enqueue("email.send", ["b@x", "hi"], idempotency_key="mail-bad")
    [record] = wait_dead(celery_app, "email")
    assert record.reason == "permanent_failure" and record.attempts == 1
    assert record.exception_type == "DownstreamRejected" and "422" in record.exception_message
    assert sims["email"].ledger()["failed_attempts"] == {"mail-bad": 1}


def test_arguments_that_do_not_fit_are_dead_lettered(
        broker, sims, celery_app, start_worker, worker_env):
    start_worker("email", env=worker_env)
    celery_app.send_task("email.send", args=["only-one"], kwargs={"bogus": 1}, queue="email")
    [record] = wait_dead(celery_app, "email")
    assert record.reason == "invalid_arguments"
    assert "bogus" in record.exception_message or "subject" in record.exception_message
    assert sims["email"].ledger()["requests"] == 0


def test_open_circuit_is_not_called_and_retried_later(
        broker, sims, producer, start_worker, worker_env, celery_app, settings, fast_policy):
    """A refused charge never reached the provider, so retrying it later is safe."""
    worker = start_worker("payments", env=worker_env)
    force_breaker(settings, fast_policy, "payments", "open", seconds=5)
    job = producer.enqueue("payments.charge", ["acct-3", 900])
    wait_until(lambda: "failed: CircuitOpen" in worker.output(), 30, message="a refused attempt")
    assert "retry in" in worker.output()
    assert sims["payments"].ledger()["requests"] == 0
    # the circuit goes half-open after 5 s; the retried charge is its trial call
    ledger = wait_until(lambda: (lg := sims["payments"].ledger())["applied"] == 1 and lg, 60,
                        message="the charge after the circuit closed")
    assert ledger["effects"][job.id]["requests"] == 1
    assert dead_letters(celery_app, "payments") == []


def test_open_circuit_with_default_fallback_still_indexes_later(
        broker, sims, producer, start_worker, worker_env, settings, fast_policy):
    """search.index: the ranking read falls back to the default; the write waits."""
    worker = start_worker("search", env=worker_env)
    force_breaker(settings, fast_policy, "search", "open", seconds=5)
    producer.enqueue("search.index", ["doc-2"])
    wait_until(lambda: "served the default fallback" in worker.output(), 30,
               message="default fallback used")
    assert sims["search"].ledger()["requests"] == 0
    ledger = wait_until(lambda: (lg := sims["search"].ledger())["applied"] == 1 and lg, 60,
                        message="the document indexed")
    assert ledger["effects"]["index:doc-2"]["requests"] == 1


def test_duplicate_delivery_runs_once(
        broker, sims, producer, start_worker, worker_env, celery_app, state_redis):
    worker = start_worker("email,payments,search", env=worker_env, concurrency=1)
    producer.enqueue("email.send", ["c@x", "hi"], idempotency_key="dup-1")
    producer.enqueue("email.send", ["c@x", "hi"], idempotency_key="dup-1")
    # the very same message twice (e.g. a producer retry after a lost confirm)
    producer.enqueue("payments.charge", ["acct-4", 100], task_id="same-task-id")
    producer.enqueue("payments.charge", ["acct-4", 100], task_id="same-task-id")
    # idempotent and unkeyed: a task id the caller chose is not fresh, so the mark is read
    producer.enqueue("search.index", ["doc-dup"], task_id="same-index-id")
    producer.enqueue("search.index", ["doc-dup"], task_id="same-index-id")
    wait_until(lambda: len(marks(state_redis, "email.send")) == 1
               and len(marks(state_redis, "payments.charge")) == 1
               and len(marks(state_redis, "search.index")) == 1, 30, message="three marks")
    wait_until(lambda: worker.output().count("duplicate of a finished task") >= 3, 30,
               message="the three duplicates acked")
    assert sims["email"].ledger()["effects"]["dup-1"]["requests"] == 1
    assert sims["payments"].ledger()["effects"]["same-task-id"]["requests"] == 1
    assert sims["search"].ledger()["effects"]["index:doc-dup"]["requests"] == 1
    assert dead_letters(celery_app, "email") == dead_letters(celery_app, "payments") == []


def test_cached_price_and_graceful_receipt(
        broker, sims, producer, start_worker, worker_env, state_redis):
    """pricing down -> a cached price; email down -> the charge still succeeds."""
    sims["pricing"].control(price_cents=1234)
    start_worker("payments", env=worker_env)
    producer.enqueue("payments.charge", ["acct-5"], {"sku": "sku-1"}, idempotency_key="p-1")
    wait_until(lambda: sims["payments"].ledger()["applied"] == 1, 30, message="first charge")
    sims["pricing"].control(mode="down")
    sims["email"].control(mode="down")
    producer.enqueue("payments.charge", ["acct-5"], {"sku": "sku-1", "receipt_to": "r@x"},
                     idempotency_key="p-2")
    ledger = wait_until(lambda: (lg := sims["payments"].ledger())["applied"] == 2 and lg, 30,
                        message="second charge")
    assert ledger["effects"]["p-2"]["payload"]["amount_cents"] == 1234  # the cached price
    done = wait_until(lambda: (m := marks(state_redis, "payments.charge").get("key:p-2"))
                      and m["s"] == "done" and m, 10, message="done mark")
    receipt = done["r"]["receipt"]
    assert receipt["type"] == "Unavailable" and receipt["dependency"] == "email"
    assert "receipt will follow" in receipt["message"]


def _email_deferrals(broker, settings, policy, moto_sqs, prefix):
    """The email deferral store the worker writes to, read directly from moto."""
    from workers.deferral import sink_for
    from workers.settings import load_settings

    return sink_for("email", load_settings(
        broker_url=broker.url, redis_url=settings.redis_url, policy_file=policy,
        sqs_endpoint_url=moto_sqs.url, deferral_queue_prefix=prefix,
        aws_access_key_id="testing", aws_secret_access_key="testing"))


def test_email_refused_by_an_open_circuit_is_queued_for_later(
        broker, sims, producer, start_worker, worker_env, celery_app, settings, fast_policy,
        moto_sqs, deferral_prefix, state_redis):
    """email.send: the dependency was not called; the request waits in SQS, not in the DLQ."""
    from tests.conftest import sqs_env

    env = {**worker_env, **sqs_env(moto_sqs, deferral_prefix)}
    worker = start_worker("email", env=env)
    force_breaker(settings, fast_policy, "email", "open", seconds=600)
    job = producer.enqueue("email.send", ["later@x", "hi"], priority="medium")
    wait_until(lambda: "deferred as" in worker.output(), 30, message="the email deferred")
    store = _email_deferrals(broker, settings, fast_policy, moto_sqs, deferral_prefix)
    [entry] = store.peek(10, hold_s=1)
    request = entry.request
    assert (request.task, list(request.args), request.dependency) == (
        "email.send", ["later@x", "hi"], "email")
    assert request.idempotency_key == job.id  # the replay reuses the downstream key
    assert "CircuitOpen" in request.reason
    assert sims["email"].ledger()["requests"] == 0
    assert dead_letters(celery_app, "email") == []
    assert f"task:{job.id}" not in marks(state_redis, "email.send")  # not "done": not sent


def test_task_whose_deadline_passed_in_the_queue_is_dead_lettered_not_run(
        broker, sims, producer, start_worker, worker_env, celery_app):
    import time

    deadline = time.time() + 0.2
    job = producer.enqueue("email.send", ["late@x", "hi"], idempotency_key="late-1",
                           deadline_s=0.2)
    wait_until(lambda: time.time() > deadline + 0.1, 5, message="the deadline passed")
    start_worker("email", env=worker_env)
    [record] = wait_dead(celery_app, "email")
    assert (record.reason, record.task_id) == ("deadline_expired", job.id)
    assert sims["email"].ledger()["requests"] == 0


def test_rabbitmq_native_dead_lettering_is_listed_and_replayable(
        broker, sims, celery_app, start_worker, worker_env, fast_policy):
    """A message RabbitMQ dead-letters by itself (here: expired) lands in the same DLQ."""
    from tests.integration._delivery import cli

    if broker.name != "amqp":
        pytest.skip("native dead-lettering is RabbitMQ's")
    from kombu import Connection

    result = celery_app.send_task("search.index", args=["doc-native"], queue="search",
                                  headers={"tidegate_idempotency_key": "native-1"},
                                  expiration=0.05)
    with Connection(broker.url, connect_timeout=5) as conn:
        wait_until(lambda: conn.default_channel.queue_declare(
            "search.dlq", passive=True).message_count == 1, 30, message="native DLQ entry")
    [record] = dead_letters(celery_app, "search")
    assert (record.reason, record.task, record.task_id) == (
        "rejected_by_broker", "search.index", result.id)
    assert record.args == ["doc-native"] and record.idempotency_key == "native-1"
    assert "expired" in record.exception_message
    replay = cli(broker, fast_policy, "dlq", "replay", "search", "--all")
    assert replay.returncode == 0, replay.stderr
    start_worker("search", env=worker_env)
    wait_until(lambda: sims["search"].ledger()["applied"] == 1, 30, message="replayed index")
    assert list(sims["search"].ledger()["effects"]) == ["native-1"]


def test_a_replayed_email_deferred_again_keeps_its_history_and_is_capped(
        broker, sims, celery_app, start_worker, worker_env, settings, fast_policy,
        moto_sqs, deferral_prefix, state_redis):
    """The replayer's headers reach the fallback: a second deferral continues the count and
    the first-deferral time; past max_deferrals (5) the request is not deferred again."""
    from tests.conftest import sqs_env
    from workers import headers as h

    worker = start_worker("email", env={**worker_env, **sqs_env(moto_sqs, deferral_prefix)})
    force_breaker(settings, fast_policy, "email", "open", seconds=600)
    first_at = 1_700_000_000.0

    def as_replayed(key: str, deferrals: int) -> None:
        celery_app.send_task("email.send", args=[f"{key}@x", "hi"], queue="email",
                             headers={h.IDEMPOTENCY_KEY: key, h.DEFERRALS: deferrals,
                                      h.FIRST_DEFERRED_AT: first_at})

    as_replayed("again-1", 2)
    wait_until(lambda: "deferred as" in worker.output(), 30, message="deferred again")
    store = _email_deferrals(broker, settings, fast_policy, moto_sqs, deferral_prefix)
    [entry] = store.peek(10, hold_s=1)
    assert (entry.request.idempotency_key, entry.request.deferrals) == ("again-1", 3)
    assert entry.request.first_deferred_at == first_at

    as_replayed("capped-1", 5)
    wait_until(lambda: "not queued for later" in worker.output(), 30,
               message="the sixth deferral refused")
    assert "already deferred 5 times" in worker.output()
    assert [e.request.idempotency_key for e in store.peek(10, hold_s=1)] == ["again-1"]
    assert sims["email"].ledger()["requests"] == 0  # the circuit is open: nothing was sent
