"""The worker-loss scenario shared by test_worker_liveness.py and the kill drill.

A worker takes long tasks (each 60 s at the simulators) of a mixed batch: unkeyed charges
(not idempotent), keyed charges and index jobs (idempotent); short email jobs keep flowing
through another worker the whole time. The long worker is SIGKILLed; the simulators turn
fast; a fresh worker starts. Measured: how long after the kill each task the dead worker
held was back on its queue (Redis: its holder record gone with the message restored; SQS:
received again), and when every job was accounted for.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tests.integration._delivery import dead_letters, marks
from tests.support.procs import wait_until

LONG_MS = 60_000  # each long task's call at the simulator

KINDS = ("charge", "charge-keyed", "index")


@dataclass
class Outcome:
    jobs: list[tuple[str, str, str]]  # (task, task id, mark key)
    back_after_s: dict[str, float]  # task id -> seconds from the kill to back on its queue
    accounted_after_s: float  # seconds from the kill to every job done or dead-lettered
    done: set[str]
    dead: set[str]
    reruns: int
    emails: int
    records: list[Any] = field(default_factory=list)

    def summary(self, label: str) -> str:
        back = sorted(self.back_after_s.values())
        return (f"[{label}] SIGKILL with {len(back)} long tasks held: back on the queue after "
                f"{back[0]:.1f}-{back[-1]:.1f} s (max {back[-1]:.1f} s); all {len(self.jobs)} "
                f"jobs accounted for {self.accounted_after_s:.1f} s after the kill "
                f"({len(self.done)} completed, {len(self.dead)} dead-lettered outcome_unknown, "
                f"{self.reruns} idempotent re-runs); {self.emails} short jobs meanwhile")


def enqueue_batch(producer, tag: str, per_kind: int = 2) -> list[tuple[str, str, str]]:
    jobs = []
    for i in range(per_kind):
        r = producer.enqueue("payments.charge", [f"acct-{tag}-{i}", 100 + i])
        jobs.append(("payments.charge", r.id, f"task:{r.id}"))
        r = producer.enqueue("payments.charge", [f"acct-{tag}-k{i}", 200 + i],
                             idempotency_key=f"order-{tag}-{i}")
        jobs.append(("payments.charge", r.id, f"key:order-{tag}-{i}"))
        r = producer.enqueue("search.index", [f"doc-{tag}-{i}"])
        jobs.append(("search.index", r.id, f"task:{r.id}"))
    return jobs


class EmailFlow:
    """Short keyed email jobs, a few a second, until stopped: the rest of the mixed load."""

    def __init__(self, producer, tag: str, rate: float = 4.0) -> None:
        self.producer, self.tag, self.interval = producer, tag, 1.0 / rate
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            key = f"mail-{self.tag}-{len(self.sent)}"
            self.producer.enqueue("email.send", [f"{key}@x", "hi"], idempotency_key=key)
            self.sent.append(key)
            self._stop.wait(self.interval)

    def __enter__(self) -> EmailFlow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def accounted(jobs, state_redis, celery_app) -> Callable[[], tuple[set[str], set[str]] | None]:
    def check() -> tuple[set[str], set[str]] | None:
        done = {tid for task, tid, key in jobs
                if marks(state_redis, task).get(key, {}).get("s") == "done"}
        dead = {r.task_id for q in ("payments", "search") for r in dead_letters(celery_app, q)}
        return (done, dead) if len(done | dead) == len(jobs) else None

    return check


def check_outcome(outcome: Outcome, sims, celery_app) -> None:
    """None lost, none twice; only unkeyed charges dead-lettered, as outcome_unknown."""
    jobs = outcome.jobs
    assert not outcome.done & outcome.dead, "a job both completed and dead-lettered"
    assert outcome.done | outcome.dead == {tid for _, tid, _ in jobs}
    unkeyed = {tid for task, tid, key in jobs
               if task == "payments.charge" and key.startswith("task:")}
    records = [r for q in ("payments", "search") for r in dead_letters(celery_app, q)]
    assert {r.task_id for r in records} == outcome.dead
    assert outcome.dead <= unkeyed
    assert {r.reason for r in records} <= {"outcome_unknown"}
    payments = sims["payments"].ledger()["effects"]
    for tid in unkeyed:  # the killed worker's charge reached the provider once, never again
        assert payments.get(tid, {"requests": 1})["requests"] == 1, tid
    keyed = [key.split(":", 1)[1] for task, _, key in jobs
             if task == "payments.charge" and key.startswith("key:")]
    assert all(k in payments for k in keyed)
    index = sims["search"].ledger()["effects"]
    assert len(index) == sum(1 for t, _, _ in jobs if t == "search.index")


def wait_in_flight(sims, n: int, timeout: float = 60) -> None:
    """Until ``n`` long calls are in flight at payments + search."""
    wait_until(lambda: sims["payments"].ledger()["requests"]
               + sims["search"].ledger()["requests"] >= n, timeout, interval=0.2,
               message=f"{n} long calls in flight")


def wait_killed_calls_land(sims, jobs) -> None:
    """The dead worker's calls still sleep at the simulators; let them land here, not in the
    next test's ledger (each charge's task id or key is its effect's key)."""
    keys = [key.split(":", 1)[1] for task, _, key in jobs if task == "payments.charge"]
    wait_until(lambda: all(k in sims["payments"].ledger()["effects"] for k in keys),
               LONG_MS / 1000 + 30, interval=1, message="the killed worker's charges landed")


def timed(since: float) -> float:
    return time.monotonic() - since


_RECEIVED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] "
                       r"Task [\w.]+\[([0-9a-f-]{36})\] received", re.M)


def received_at(worker) -> dict[str, float]:
    """Task id -> epoch seconds of the first 'Task ...[id] received' line in a worker's log."""
    out: dict[str, float] = {}
    for stamp, task_id in _RECEIVED.findall(worker.output()):
        when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.setdefault(task_id, when)
    return out
