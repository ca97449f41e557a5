"""A real worker SIGKILLed mid-task: idempotent work runs again and completes once;
non-idempotent work is not run again, it is dead-lettered as "outcome unknown".

On RabbitMQ the killed consumer's unacked messages return at once; on Redis within about
20 s, by the orphan sweep (heartbeat TTL + one sweep interval; the visibility timeout, 30 s in
these tests, see ``_delivery.LIMITS``, stays the last resort).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.integration._delivery import LIMITS, dead_letters, marks, wait_dead, write_policy
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

REDELIVERY_S = 120  # visibility timeout + kombu's restore sweep, on a loaded machine


@pytest.fixture
def slow_env(sims, tmp_path: Path) -> dict[str, str]:
    """Timeouts long enough to kill a worker while a call is in flight, and far above the
    simulators' latency here (400 ms): an email call timed out by a busy machine would be
    retried, and the provider, which applied it anyway, would count a second request."""
    policy = write_policy(tmp_path / "slow-policy.toml", sims, payments_timeout_ms=8000,
                          payments_deadline_ms=9000, search_timeout_ms=8000,
                          search_deadline_ms=9000, email_timeout_ms=4000,
                          email_deadline_ms=5000)
    return {"TIDEGATE_POLICY_FILE": str(policy), **LIMITS}


def test_non_idempotent_task_of_a_killed_worker_is_not_run_again(
        broker, sims, producer, start_worker, slow_env, celery_app, state_redis):
    sims["payments"].control(mode="slow", latency_ms=4000)
    first = start_worker("payments", env=slow_env)
    job = producer.enqueue("payments.charge", ["acct-k", 4200], priority="critical")
    wait_until(lambda: sims["payments"].ledger()["requests"] == 1, 30,
               message="the charge in flight")
    first.kill()
    sims["payments"].control(mode="healthy")
    start_worker("payments", env=slow_env)
    [record] = wait_dead(celery_app, "payments", timeout=REDELIVERY_S)
    assert record.reason == "outcome_unknown" and record.task_id == job.id
    assert record.needs_force  # replaying it is the operator's decision
    ledger = sims["payments"].ledger()
    assert ledger["requests"] == 1  # never called a second time
    assert ledger["effects"].get(job.id, {"requests": 1})["requests"] == 1


def test_idempotent_task_of_a_killed_worker_runs_again_once(
        broker, sims, producer, start_worker, slow_env, celery_app, state_redis):
    sims["search"].control(mode="slow", latency_ms=3000)
    first = start_worker("search", env=slow_env)
    job = producer.enqueue("search.index", ["doc-k"])
    # the ranking read, then the write: kill while the write is in flight
    wait_until(lambda: sims["search"].ledger()["requests"] >= 2, 30, message="write in flight")
    first.kill()
    sims["search"].control(mode="healthy")
    second = start_worker("search", env=slow_env)
    wait_until(lambda: marks(state_redis, "search.index").get(f"task:{job.id}", {}).get("s")
               == "done", REDELIVERY_S, message="the redelivered index done")
    assert "redelivered after an unfinished" in second.output()
    ledger = sims["search"].ledger()
    assert ledger["applied"] == 1 and list(ledger["effects"]) == ["index:doc-k"]
    assert dead_letters(celery_app, "search") == []


def test_sigkill_under_mixed_load_loses_nothing_and_repeats_no_effect(
        broker, sims, producer, start_worker, slow_env, celery_app, state_redis):
    """jobs in = jobs completed + jobs dead-lettered; no effect twice."""
    for name in ("payments", "search", "email"):
        sims[name].control(mode="slow", latency_ms=400)
    jobs: list[tuple[str, str, str]] = []  # (task, task id, mark key)
    plan = (["charge"] * 10 + ["charge-keyed"] * 5 + ["index"] * 10 + ["email"] * 5)
    random.Random(7).shuffle(plan)
    for i, kind in enumerate(plan):
        if kind == "charge":
            r = producer.enqueue("payments.charge", [f"acct-{i}", 100 + i])
            jobs.append(("payments.charge", r.id, f"task:{r.id}"))
        elif kind == "charge-keyed":
            r = producer.enqueue("payments.charge", [f"acct-{i}", 100 + i],
                                 idempotency_key=f"order-{i}")
            jobs.append(("payments.charge", r.id, f"key:order-{i}"))
        elif kind == "index":
            r = producer.enqueue("search.index", [f"doc-{i}"])
            jobs.append(("search.index", r.id, f"task:{r.id}"))
        else:
            r = producer.enqueue("email.send", [f"u{i}@x", "hi"], idempotency_key=f"mail-{i}")
            jobs.append(("email.send", r.id, f"key:mail-{i}"))

    first = start_worker("payments,search,email", env=slow_env, concurrency=4)
    wait_until(lambda: sum(sims[n].ledger()["applied"] for n in ("payments", "search",
                                                                  "email")) >= 8,
               60, message="some jobs done before the kill")
    first.kill()
    for name in ("payments", "search", "email"):
        sims[name].control(mode="healthy")
    second = start_worker("payments,search,email", env=slow_env, concurrency=4)

    def accounted() -> tuple[set[str], set[str]] | None:
        done = {tid for task, tid, key in jobs
                if marks(state_redis, task).get(key, {}).get("s") == "done"}
        dead = {r.task_id for q in ("payments", "search", "email")
                for r in dead_letters(celery_app, q)}
        return (done, dead) if len(done | dead) == len(jobs) else None

    done, dead = wait_until(accounted, REDELIVERY_S + 60, interval=0.5,
                            message="every job completed or dead-lettered")
    print(f"\n[{broker.name}] SIGKILL under mixed load: {len(jobs)} jobs in = {len(done)} "
          f"completed + {len(dead)} dead-lettered (outcome unknown); "
          f"{second.output().count('redelivered after an unfinished')} idempotent re-runs")
    assert not done & dead, "a job both completed and dead-lettered"
    assert done | dead == {tid for _, tid, _ in jobs}

    unkeyed_charges = {tid for task, tid, key in jobs
                       if task == "payments.charge" and key.startswith("task:")}
    records = [r for q in ("payments", "search", "email") for r in dead_letters(celery_app, q)]
    # only work that could not safely run again was dead-lettered, and only for worker loss
    assert {r.task_id for r in records} <= unkeyed_charges
    assert {r.reason for r in records} <= {"outcome_unknown"}
    # the kill interrupted something: it was run again or dead-lettered
    assert records or "redelivered after an unfinished" in second.output()

    payments = sims["payments"].ledger()["effects"]
    for tid in unkeyed_charges:  # a non-idempotent charge reached the provider at most once
        assert payments.get(tid, {"requests": 1})["requests"] == 1, tid
    for task, tid, key in jobs:  # every completed job's effect is in its ledger, once
        if tid in done:
            ledger_key = {"payments.charge": key.split(":", 1)[1],
                          "email.send": key.split(":", 1)[1]}.get(task)
            if task == "search.index":
                continue  # keyed by document id; checked below
            assert ledger_key in payments or ledger_key in sims["email"].ledger()["effects"]
    index = sims["search"].ledger()["effects"]
    assert len(index) == sum(1 for t, tid, _ in jobs if t == "search.index")


def test_prefork_soft_time_limit_dead_letters_an_unfinished_charge(
        broker, sims, producer, start_worker, sims_slow_policy, celery_app):
    """The soft time limit is the outer backstop: the charge was sent, its outcome is unknown."""
    # The soft limit must fire after the prefork child has sent the charge: 6 s leaves room for
    # a child that starts slowly on a loaded machine (2 s did not: the limit hit before the call).
    sims["payments"].control(mode="slow", latency_ms=20000)
    env = {"TIDEGATE_POLICY_FILE": str(sims_slow_policy), "TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "6",
           "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "10", "TIDEGATE_VISIBILITY_TIMEOUT_S": "30",
           "TIDEGATE_READ_TIMEOUT_S": "30"}  # client reads must outlast the soft limit
    worker = start_worker("payments", env=env, pool="prefork", concurrency=1)
    job = producer.enqueue("payments.charge", ["acct-t", 100])
    [record] = wait_dead(celery_app, "payments", timeout=60)
    assert (record.reason, record.task_id) == ("outcome_unknown", job.id)
    assert record.exception_type == "SoftTimeLimitExceeded"
    assert sims["payments"].ledger()["requests"] == 1
    assert worker.alive()


@pytest.fixture
def sims_slow_policy(sims, tmp_path: Path) -> Path:
    return write_policy(tmp_path / "slow-policy.toml", sims, payments_timeout_ms=25000,
                        payments_deadline_ms=26000)


def test_warm_shutdown_finishes_the_running_task_and_returns_the_rest(
        broker, sims, producer, start_worker, slow_env, celery_app, state_redis):
    import signal

    sims["email"].control(mode="slow", latency_ms=400)  # well below slow_env's 4 s timeout
    jobs = [producer.enqueue("email.send", [f"s{i}@x", "hi"], idempotency_key=f"stop-{i}")
            for i in range(4)]
    first = start_worker("email", env=slow_env, concurrency=1)
    wait_until(lambda: sims["email"].ledger()["requests"] >= 1, 30, message="one in flight")
    first.kill(signal.SIGTERM)
    wait_until(lambda: not first.alive(), 30, message="the worker exits")
    assert "Warm shutdown" in first.output()
    finished = {k for k, m in marks(state_redis, "email.send").items() if m["s"] == "done"}
    assert finished, "the task in flight was finished before exiting"
    sims["email"].control(mode="healthy")
    start_worker("email", env=slow_env)
    wait_until(lambda: sims["email"].ledger()["applied"] == len(jobs), REDELIVERY_S,
               message="every email sent after the restart")
    effects = sims["email"].ledger()["effects"]
    assert all(effects[f"stop-{i}"]["requests"] == 1 for i in range(4))  # none run twice
    assert dead_letters(celery_app, "email") == []
