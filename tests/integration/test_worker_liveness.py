"""Worker liveness on Redis: a dead worker's tasks are back in seconds, a live one's never.

With the default visibility timeout (3600 s) and the default liveness settings (heartbeat
5 s, TTL 15 s, sweep 5 s), a worker SIGKILLed while it holds 60-second tasks under a mixed
load has every one of them back on its queue well within 30 s: measured and printed (run with
``-s``). The other test shortens the heartbeat and sweep intervals so a long task is one that
outlives many of them: a live worker's task is never restored, however long it runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL, Broker, tidegate_env
from tests.integration._delivery import dead_letters, wait_dead, write_policy
from tests.integration._orphans import (
    LONG_MS,
    EmailFlow,
    Outcome,
    accounted,
    check_outcome,
    enqueue_batch,
    received_at,
    wait_in_flight,
    wait_killed_calls_land,
)
from tests.support.procs import Worker, wait_until

pytestmark = pytest.mark.integration

# A call may take 60 s (the HTTP read timeout caps each call, 5 s by default). Threads pool: no
# time limit is enforced; these only satisfy soft < hard < visibility (the default 3600 s).
LONG_LIMITS = {"TIDEGATE_READ_TIMEOUT_S": "90", "TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "100",
               "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "120"}


@pytest.fixture
def redis_broker(redis_up) -> Broker:
    redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
    return Broker("redis", REDIS_BROKER_URL)


@pytest.fixture
def long_policy(sims, tmp_path: Path) -> Path:
    """Calls may take 60 s (and a bit) before they time out."""
    t = LONG_MS + 15_000
    return write_policy(tmp_path / "long-policy.toml", sims, payments_timeout_ms=t,
                        payments_deadline_ms=t + 5000, search_timeout_ms=t,
                        search_deadline_ms=t + 5000, email_timeout_ms=4000,
                        email_deadline_ms=5000)


@pytest.fixture
def app_on(long_policy):
    from workers.application import create_app
    from workers.settings import load_settings

    apps = []

    def make(broker: Broker, **extra):
        app = create_app(load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                                       policy_file=long_policy, **extra))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def run_worker_loss(broker: Broker, env: dict[str, str], app, sims, state_redis, tmp_path,
                    started: list[Worker], tag: str = "a") -> Outcome:
    """The scenario of ``_orphans``: returns what was measured (asserts nothing itself)."""
    from producers import Producer

    producer = Producer(app)
    for name in ("payments", "search"):
        sims[name].control(mode="slow", latency_ms=LONG_MS)
    sims["email"].control(mode="slow", latency_ms=50)

    def worker(queues: str, concurrency: int) -> Worker:
        w = Worker(queues, env, tmp_path, concurrency=concurrency)
        started.append(w)
        return w.wait_ready(90)

    worker("email", 2)
    jobs = enqueue_batch(producer, tag)  # 6 long: 2 charges, 2 keyed charges, 2 index jobs
    with EmailFlow(producer, tag) as flow:
        doomed = worker("payments,search", len(jobs))
        wait_in_flight(sims, len(jobs))
        held = set(received_at(doomed))
        doomed.kill()
        killed_at, killed_mono = time.time(), time.monotonic()
        for name in ("payments", "search"):
            sims[name].control(mode="healthy")
        fresh = worker("payments,search", 4)
        done, dead = wait_until(accounted(jobs, state_redis, app), 120, interval=0.5,
                                message="every job completed or dead-lettered")
        accounted_after = time.monotonic() - killed_mono
        emails = len(flow.sent)
    again = received_at(fresh)
    back = {tid: again[tid] - killed_at for tid in held if tid in again}
    # unkeyed charges found started are dead-lettered by the fresh worker: also received
    assert set(back) == held, f"not received again: {held - set(back)}"
    wait_until(lambda: sims["email"].ledger()["applied"] >= emails, 60, interval=0.5,
               message="the short jobs all sent")
    wait_killed_calls_land(sims, jobs)
    return Outcome(jobs, back, accounted_after, done, dead,
                   fresh.output().count("redelivered after an unfinished"), emails)


def test_a_killed_workers_long_tasks_are_back_in_seconds_not_the_visibility_timeout(
        redis_broker, sims, state_redis, long_policy, app_on, tmp_path):
    env = tidegate_env(redis_broker, long_policy, **LONG_LIMITS)  # default visibility: 3600 s
    app = app_on(redis_broker)
    started: list[Worker] = []
    try:
        outcome = run_worker_loss(redis_broker, env, app, sims, state_redis, tmp_path, started)
    finally:
        for w in started:
            w.stop()
    print("\n" + outcome.summary("redis, default liveness settings, visibility timeout 3600 s"))
    check_outcome(outcome, sims, app)
    assert outcome.dead, "the unkeyed charges in flight were not dead-lettered"
    assert outcome.reruns, "no idempotent task was run again"
    # target < 30 s (TTL 15 s + sweep 5 s); the bound here is loose for a loaded machine,
    # and still two orders of magnitude under the visibility timeout it replaces
    assert max(outcome.back_after_s.values()) < 90


def test_a_live_worker_keeps_its_long_task_while_a_dead_ones_come_back(
        redis_broker, sims, state_redis, long_policy, app_on, tmp_path):
    """Heartbeat 0.5 s, TTL 3 s, sweep 0.5 s: a 20-second task stands for a 5-minute one with
    the defaults (it outlives 40 sweep intervals and 6 TTLs; 5 minutes are 60 and 20). Another
    worker on the same queue would take it if it were restored; the sweep demonstrably runs
    (a killed worker's charge comes back meanwhile)."""
    from producers import Producer

    fast = {"TIDEGATE_WORKER_HEARTBEAT_S": "0.5", "TIDEGATE_WORKER_HEARTBEAT_TTL_S": "3",
            "TIDEGATE_ORPHAN_SWEEP_S": "0.5", **LONG_LIMITS}
    env = tidegate_env(redis_broker, long_policy, **fast)
    app = app_on(redis_broker)
    producer = Producer(app)
    started: list[Worker] = []

    def worker(queues: str) -> Worker:
        w = Worker(queues, env, tmp_path, concurrency=1)
        started.append(w)
        return w.wait_ready(90)

    try:
        sims["search"].control(mode="slow", latency_ms=10_000)  # ranking read + write: 20 s
        sims["payments"].control(mode="slow", latency_ms=30_000)
        keeper = worker("search")
        long_job = producer.enqueue("search.index", ["doc-live"])
        wait_until(lambda: sims["search"].ledger()["requests"] >= 1, 30, message="task started")
        task_started = time.monotonic()
        spare = worker("search")  # idle: would receive the task if it were restored
        doomed = worker("payments")
        charge = producer.enqueue("payments.charge", ["acct-dead", 500])
        wait_until(lambda: sims["payments"].ledger()["requests"] == 1, 30,
                   message="charge in flight")
        started_at = time.monotonic()
        doomed.kill()
        worker("payments")
        [record] = wait_dead(app, "payments", timeout=60)  # the dead worker's, via the sweep
        assert (record.task_id, record.reason) == (charge.id, "outcome_unknown")
        print(f"\n[redis, fast liveness] dead worker's charge dead-lettered "
              f"{time.monotonic() - started_at:.1f} s after the kill")
        wait_until(lambda: f"{long_job.id}] succeeded" in keeper.output(), 60, interval=0.5,
                   message="the long task done")
        ran_for = time.monotonic() - task_started
        assert keeper.alive()
        assert long_job.id not in spare.output(), "the live worker's task was redelivered"
        ledger = sims["search"].ledger()
        assert ledger["effects"]["index:doc-live"]["requests"] == 1
        assert ledger["requests"] == 2  # one ranking read and one write, never a second run
        assert dead_letters(app, "search") == []
        print(f"[redis, fast liveness] live worker's task ran {ran_for:.0f} s "
              f"({ran_for / 0.5:.0f} sweep intervals, {ran_for / 3:.0f} heartbeat TTLs): "
              f"never restored")
        wait_until(lambda: charge.id in sims["payments"].ledger()["effects"], 60, interval=1,
                   message="the killed worker's charge landed")
    finally:
        for w in started:
            w.stop()
