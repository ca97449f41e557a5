"""The worker-loss scenario of the kill drill, and fixtures test_worker_liveness.py shares.

A worker takes long tasks (each 60 s at the simulators) of a mixed batch: unkeyed charges
(not idempotent), keyed charges and index jobs (idempotent); short email jobs keep flowing
through another worker the whole time. The long part of each task is its first call, a read
(a charge reads its price, an index job its ranking boost), so the dead worker's calls still
sleeping at the simulators are reads: a write of the same key still in progress would rightly
be answered 409 to the re-run and hold it back as long. The long worker is SIGKILLed; the
simulators turn fast; a fresh worker starts. Measured: how long after the kill each task the
dead worker held was received again by the fresh worker, and when every job was accounted for.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL, Broker
from tests.integration._delivery import dead_letters, marks, write_policy
from tests.support.procs import Worker, wait_until

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
        return (f"[{label}] SIGKILL with {len(back)} long tasks held: received again "
                f"{back[0]:.1f}-{back[-1]:.1f} s after the kill; all {len(self.jobs)} "
                f"jobs accounted for {self.accounted_after_s:.1f} s after the kill "
                f"({len(self.done)} completed, {len(self.dead)} dead-lettered outcome_unknown, "
                f"{self.reruns} idempotent re-runs); {self.emails} short jobs meanwhile")


def enqueue_batch(producer, tag: str, per_kind: int = 2) -> list[tuple[str, str, str]]:
    jobs = []
    for i in range(per_kind):
        r = producer.enqueue("payments.charge", [f"acct-{tag}-{i}"], {"sku": f"sku-{i}"})
        jobs.append(("payments.charge", r.id, f"task:{r.id}"))
        r = producer.enqueue("payments.charge", [f"acct-{tag}-k{i}"], {"sku": f"sku-k{i}"},
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
    for tid in unkeyed:  # a charge runs at most once (those found started: never)
        assert payments.get(tid, {"requests": 1})["requests"] == 1, tid
    assert all(tid not in payments for tid in outcome.dead)
    keyed = [key.split(":", 1)[1] for task, _, key in jobs
             if task == "payments.charge" and key.startswith("key:")]
    assert all(k in payments for k in keyed)
    index = sims["search"].ledger()["effects"]
    assert len(index) == sum(1 for t, _, _ in jobs if t == "search.index")


LONG_SIMS = ("pricing", "search")  # where the long reads go


def wait_in_flight(sims, n: int, timeout: float = 60) -> None:
    """Until ``n`` long reads are in flight at pricing + search."""
    wait_until(lambda: sum(sims[s].ledger()["requests"] for s in LONG_SIMS) >= n, timeout,
               interval=0.2, message=f"{n} long calls in flight")


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


# A call may take 60 s (the HTTP read timeout caps each call, 5 s by default). Threads pool: no
# time limit is enforced; these only satisfy soft < hard < visibility (the default 3600 s).
LONG_LIMITS = {"TIDEGATE_LOG_TASKS": "true",  # received_at() reads the "received" lines
               "TIDEGATE_READ_TIMEOUT_S": "90", "TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "100",
               "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "120"}


@dataclass(frozen=True)
class Target:
    """A broker plus what a worker (env) and the test's app (settings) need to use it."""

    broker: Broker
    env: dict[str, str]
    settings: dict[str, object]


@pytest.fixture(params=["redis", "sqs"])
def target(request, redis_up, tmp_path, monkeypatch) -> Target:
    if request.param == "redis":
        redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
        return Target(Broker("redis", REDIS_BROKER_URL), {}, {})
    moto = request.getfixturevalue("moto_sqs")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    prefix = f"l{uuid.uuid4().hex[:8]}-"  # this test's queues only: the moto server is shared
    return Target(Broker("sqs", f"sqs://testing:testing@127.0.0.1:{moto.port}/"),
                  {"TIDEGATE_SQS_ENDPOINT_URL": moto.url, "TIDEGATE_SQS_QUEUE_PREFIX": prefix,
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                  {"sqs_endpoint_url": moto.url, "sqs_queue_prefix": prefix})


@pytest.fixture
def long_policy(sims, tmp_path: Path) -> Path:
    """Calls may take 60 s (and a bit) before they time out, the price read included."""
    t = LONG_MS + 15_000
    path = write_policy(tmp_path / "long-policy.toml", sims, payments_timeout_ms=t,
                        payments_deadline_ms=2 * t, search_timeout_ms=t,
                        search_deadline_ms=2 * t, email_timeout_ms=4000,
                        email_deadline_ms=5000)
    text = path.read_text()
    pricing = "timeout_ms = 300\ndeadline_ms = 600"  # only [dependencies.pricing] has these
    assert text.count(pricing) == 1, "the pricing dependency's timeouts were not found"
    path.write_text(text.replace(pricing, f"timeout_ms = {t}\ndeadline_ms = {2 * t}"))
    return path


@pytest.fixture
def app_on(long_policy):
    from workers.application import create_app
    from workers.settings import load_settings

    apps = []

    def make(target: Target, **extra):
        app = create_app(load_settings(broker_url=target.broker.url, redis_url=STATE_REDIS_URL,
                                       policy_file=long_policy, **target.settings, **extra))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def run_worker_loss(env: dict[str, str], app, sims, state_redis, tmp_path,
                    started: list[Worker], tag: str = "a", per_kind: int = 2) -> Outcome:
    """The scenario of ``_orphans``: returns what was measured (asserts nothing itself)."""
    from producers import Producer

    producer = Producer(app)
    for name in LONG_SIMS:
        sims[name].control(mode="slow", latency_ms=LONG_MS)
    sims["email"].control(mode="slow", latency_ms=50)

    def worker(queues: str, concurrency: int) -> Worker:
        w = Worker(queues, env, tmp_path, concurrency=concurrency)
        started.append(w)
        return w.wait_ready(90)

    worker("email", 2)
    jobs = enqueue_batch(producer, tag, per_kind)  # per kind: charges, keyed charges, index
    with EmailFlow(producer, tag) as flow:
        doomed = worker("payments,search", len(jobs))
        wait_in_flight(sims, len(jobs))
        held = set(received_at(doomed))
        doomed.kill()
        killed_at, killed_mono = time.time(), time.monotonic()
        for name in LONG_SIMS:
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
    return Outcome(jobs, back, accounted_after, done, dead,
                   fresh.output().count("redelivered after an unfinished"), emails)
