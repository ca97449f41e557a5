# ruff: noqa: F811  (pytest fixtures imported from _delivery are parameters here)
"""``tidegate dlq``: dead-letter, list, show, replay (with and without --force), purge."""

from __future__ import annotations

import json

import pytest

from tests.integration._delivery import (  # noqa: F401
    cli,
    dead_letters,
    fast_policy,
    marks,
    wait_dead,
    worker_env,
)
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration


def test_replay_round_trip_applies_the_effect_once(
        broker, sims, producer, start_worker, worker_env, celery_app, fast_policy, state_redis):
    sims["payments"].control(mode="down")
    sims["email"].control(mode="failing", error_rate=1.0, error_status=422)
    start_worker("payments,email", env=worker_env)
    charge = producer.enqueue("payments.charge", ["acct-r", 321], priority="critical")
    mail = producer.enqueue("email.send", ["r@x", "hi"], idempotency_key="mail-r")
    [record] = wait_dead(celery_app, "payments")
    wait_dead(celery_app, "email")

    listed = cli(broker, fast_policy, "dlq", "list", "payments", "--json")
    assert listed.returncode == 0, listed.stderr
    [doc] = json.loads(listed.stdout)
    assert doc["id"] == record.id and doc["task_id"] == charge.id
    assert doc["reason"] == "transient_failure_not_idempotent"
    shown = cli(broker, fast_policy, "dlq", "show", "payments", record.id[:8])
    assert shown.returncode == 0 and "needs --force" in shown.stdout
    assert "Traceback" in shown.stdout

    sims["payments"].control(mode="healthy")
    sims["email"].control(mode="healthy")
    refused = cli(broker, fast_policy, "dlq", "replay", "payments", "--id", record.id)
    assert refused.returncode == 2
    assert "--force" in refused.stderr and "not idempotent" in refused.stderr
    assert len(dead_letters(celery_app, "payments")) == 1  # nothing was touched

    forced = cli(broker, fast_policy, "dlq", "replay", "payments", "--id", record.id,
                 "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["replayed"][0]["task_id"] == charge.id
    ledger = wait_until(lambda: (lg := sims["payments"].ledger())["applied"] == 1 and lg, 30,
                        message="the replayed charge")
    assert ledger["effects"][charge.id]["requests"] == 1
    assert dead_letters(celery_app, "payments") == []

    # a keyed idempotent task replays without --force; a second replay finds nothing
    replay_all = cli(broker, fast_policy, "dlq", "replay", "email", "--all")
    assert replay_all.returncode == 0 and "replayed 1" in replay_all.stdout
    wait_until(lambda: sims["email"].ledger()["applied"] == 1, 30, message="replayed email")
    assert sims["email"].ledger()["effects"]["mail-r"]["requests"] == 1
    wait_until(lambda: marks(state_redis, "email.send")["key:mail-r"]["s"] == "done", 10,
               message="done mark")
    assert mail.id  # the replay kept the task's identity through the key
    again = cli(broker, fast_policy, "dlq", "replay", "email", "--all", "--json")
    assert json.loads(again.stdout)["replayed"] == []


def test_purge_needs_yes_and_empties_the_dlq(
        broker, sims, producer, start_worker, worker_env, celery_app, fast_policy):
    sims["email"].control(mode="failing", error_rate=1.0, error_status=400)
    start_worker("email", env=worker_env)
    for i in range(3):
        producer.enqueue("email.send", [f"p{i}@x", "hi"], idempotency_key=f"purge-{i}")
    wait_dead(celery_app, "email", 3)
    refused = cli(broker, fast_policy, "dlq", "purge", "email")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(dead_letters(celery_app, "email")) == 3
    done = cli(broker, fast_policy, "dlq", "purge", "email", "--yes")
    assert done.returncode == 0 and "purged 3" in done.stdout
    assert dead_letters(celery_app, "email") == []


def test_unknown_queue_is_a_clear_error(broker, fast_policy):
    result = cli(broker, fast_policy, "dlq", "list", "nosuchqueue")
    assert result.returncode == 2
    assert "unknown queue 'nosuchqueue'" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_broker_is_one_line_exit_3_without_the_password(fast_policy):
    from tests.conftest import Broker

    down = Broker("amqp", "amqp://guest:s3cret@127.0.0.1:1//")
    result = cli(down, fast_policy, "dlq", "list", "payments")
    assert result.returncode == 3
    assert "broker unreachable" in result.stderr and "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_replay_all_replays_what_it_may_and_lists_what_needs_force(
        broker, sims, producer, start_worker, worker_env, celery_app, fast_policy):
    sims["payments"].control(mode="down")
    start_worker("payments", env=worker_env)
    unkeyed = producer.enqueue("payments.charge", ["acct-u", 5], priority="critical")
    keyed = producer.enqueue("payments.charge", ["acct-k", 7], priority="critical",
                             idempotency_key="charge-k")
    wait_dead(celery_app, "payments", 2)
    sims["payments"].control(mode="healthy")

    out = cli(broker, fast_policy, "dlq", "replay", "payments", "--all", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [r["task_id"] for r in doc["replayed"]] == [keyed.id]
    [blocked] = doc["needs_force"]
    [left] = dead_letters(celery_app, "payments")
    assert blocked["id"] == left.id and left.task_id == unkeyed.id
    wait_until(lambda: sims["payments"].ledger()["applied"] == 1, 30, message="keyed charge")

    text = cli(broker, fast_policy, "dlq", "replay", "payments", "--all")
    assert text.returncode == 0 and "replayed 0" in text.stdout
    assert "--force" in text.stdout and left.id in text.stdout
