# ruff: noqa: F811  (pytest fixtures imported from _orphans are parameters here)
"""Worker liveness on Redis and SQS: a live worker's long task is never taken from it.

A dead worker's tasks coming back in seconds with the default settings is the kill drill's
(tests/drills/test_worker_kill.py, which `make test` runs short). Here the heartbeat, sweep and
SQS visibility are shortened so a long task is one that outlives many of them: a live worker's
task is never redelivered, however long it runs, while a killed worker's charge next to it is
dead-lettered by the same sweep.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import tidegate_env
from tests.integration._delivery import dead_letters, wait_dead
from tests.integration._orphans import (  # noqa: F401  (fixtures)
    LONG_LIMITS,
    app_on,
    long_policy,
    target,
)
from tests.support.procs import Worker, wait_until

pytestmark = pytest.mark.integration

def test_a_live_worker_keeps_its_long_task_while_a_dead_ones_come_back(
        target, sims, state_redis, long_policy, app_on, tmp_path):
    """Heartbeat 0.5 s, TTL 3 s, sweep 0.5 s: a 16-second task stands for a 4-minute one with
    the defaults (it outlives 32 sweep intervals and 5 TTLs; 4 minutes are 48 and 16). Another
    worker on the same queue would take it if it were restored; the sweep demonstrably runs
    (a killed worker's charge comes back meanwhile)."""
    from producers import Producer

    fast = {"TIDEGATE_WORKER_HEARTBEAT_S": "0.5", "TIDEGATE_WORKER_HEARTBEAT_TTL_S": "3",
            "TIDEGATE_ORPHAN_SWEEP_S": "0.5", "TIDEGATE_SQS_VISIBILITY_TIMEOUT_S": "3",
            **LONG_LIMITS}
    env = tidegate_env(target.broker, long_policy, **fast, **target.env)
    app = app_on(target, worker_heartbeat_s=0.5, worker_heartbeat_ttl_s=3,
                 sqs_visibility_timeout_s=3)  # SQS queues take their timeout at creation
    producer = Producer(app)
    started: list[Worker] = []

    def worker(queues: str) -> Worker:
        w = Worker(queues, env, tmp_path, concurrency=1)
        started.append(w)
        return w.wait_ready(90)

    try:
        sims["search"].control(mode="slow", latency_ms=8_000)  # ranking read + write: 16 s
        sims["payments"].control(mode="slow", latency_ms=12_000)  # outlasts the kill
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
        print(f"\n[{target.broker.name}, fast liveness] dead worker's charge dead-lettered "
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
        print(f"[{target.broker.name}, fast liveness] live worker's task ran {ran_for:.0f} s "
              f"({ran_for / 0.5:.0f} sweep intervals or visibility extensions, "
              f"{ran_for / 3:.0f} heartbeat TTLs or SQS visibility timeouts): never redelivered")
        wait_until(lambda: charge.id in sims["payments"].ledger()["effects"], 60, interval=1,
                   message="the killed worker's charge landed")
    finally:
        for w in started:
            w.stop()
