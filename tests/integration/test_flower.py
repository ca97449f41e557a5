"""Stock Flower (started with the broker URL only) against real Tidegate workers.

Flower learns tasks from Celery's task events and workers from ``celery inspect``; it must show
each task's true outcome: served -> SUCCESS, dead-lettered -> FAILURE with the DLQ reason,
queued for later -> DEFERRED (never SUCCESS). A plain Celery producer with a result backend
reads the same states from the backend.
"""

# ruff: noqa: F811  (pytest fixtures imported from _delivery are parameters here)
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from celery import Celery

from tests.conftest import STATE_REDIS_URL, sqs_env
from tests.integration._delivery import (  # noqa: F401  (fixtures)
    fast_policy,
    force_breaker,
    worker_env,
)
from tests.support.procs import BIN, Proc, free_port, wait_until

pytestmark = pytest.mark.integration

AUTH = ("flower", "test-only")


class Flower(Proc):
    """``celery --broker=URL flower --port=P``: no ``-A``, nothing of Tidegate's."""

    def __init__(self, broker_url: str, tmp: Path) -> None:
        self.port = free_port()
        super().__init__([str(BIN / "celery"), f"--broker={broker_url}", "flower",
                          f"--port={self.port}", "--address=127.0.0.1",
                          f"--basic-auth={AUTH[0]}:{AUTH[1]}", "--persistent=False"],
                         {}, tmp / "flower.log", "flower")
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", auth=AUTH,
                                 timeout=30)
        wait_until(lambda: self.http.get("/api/tasks").status_code == 200, 60,
                   message=f"flower on port {self.port}")

    def tasks(self) -> dict:
        return self.http.get("/api/tasks").json()

    def stop(self, timeout: float = 10.0) -> None:
        self.http.close()
        super().stop(timeout)


@pytest.fixture
def flower(broker, tmp_path):
    proc = Flower(broker.url, tmp_path)
    yield proc
    proc.stop()


def test_flower_lists_workers_and_true_outcomes(
        broker, sims, producer, start_worker, worker_env, settings, fast_policy, moto_sqs,
        deferral_prefix, flower, state_redis):
    worker = start_worker("search,email", env={
        **worker_env, **sqs_env(moto_sqs, deferral_prefix),
        "CELERY_RESULT_BACKEND": STATE_REDIS_URL})
    served = producer.enqueue("search.index", ["doc-flower"]).id
    dead = producer.enqueue("search.index", [], {"unexpected": 1}).id  # bad arguments -> DLQ
    # a plain Celery producer that wants results: its own backend, ignore_result=False
    plain = Celery("plain", broker=broker.url, backend=STATE_REDIS_URL)
    where = ({"queue": "email"} if broker.name == "redis"
             else {"exchange": "email", "routing_key": "email"})
    force_breaker(settings, fast_policy, "email", "open", seconds=600)
    try:
        later = plain.send_task("email.send", args=["f@x", "hi"], ignore_result=False,
                                **where)
        try:
            got = wait_until(lambda: (t := flower.tasks()) and all(
                t.get(i, {}).get("state") in ("SUCCESS", "FAILURE", "DEFERRED")
                for i in (served, dead, later.id)) and t, 90, interval=0.5,
                message="three finished tasks in flower")
        except AssertionError:
            raise AssertionError(f"flower: {flower.tasks()}\nworker:\n"
                                 f"{worker.output()[-3000:]}\nflower log:\n"
                                 f"{flower.output()[-2000:]}") from None
        assert got[served]["state"] == "SUCCESS"
        assert got[served]["name"] == "search.index"
        assert got[dead]["state"] == "FAILURE"
        assert "invalid_arguments" in got[dead]["exception"]
        assert "DeadLettered" in got[dead]["exception"]
        assert got[later.id]["state"] == "DEFERRED"
        # the result backend says the same (no SUCCESS for work that was only queued)
        wait_until(lambda: plain.AsyncResult(later.id).state == "DEFERRED", 30,
                   message="DEFERRED in the result backend")
        assert plain.AsyncResult(later.id).info["dependency"] == "email"
    finally:
        plain.close()
    workers = flower.http.get("/api/workers", params={"refresh": 1}).json()
    assert worker.node in workers, workers
    assert "Control command error" not in worker.output()


def test_dead_letter_is_a_failure_in_the_result_backend(
        broker, sims, start_worker, worker_env, state_redis):
    """A plain producer's task that Tidegate dead-letters reads FAILURE, with the reason."""
    start_worker("search", env={**worker_env, "CELERY_RESULT_BACKEND": STATE_REDIS_URL})
    plain = Celery("plain", broker=broker.url, backend=STATE_REDIS_URL)
    where = ({"queue": "search"} if broker.name == "redis"
             else {"exchange": "search", "routing_key": "search"})
    try:
        bad = plain.send_task("search.index", args=[], kwargs={"x": 1}, ignore_result=False,
                              **where)
        ok = plain.send_task("search.index", args=["doc-backend"], ignore_result=False,
                             **where)
        wait_until(lambda: bad.state == "FAILURE" and ok.state == "SUCCESS", 60,
                   interval=0.2, message="FAILURE and SUCCESS in the backend")
        assert "invalid_arguments" in str(bad.result)
        assert type(bad.result).__name__ == "DeadLettered"
    finally:
        plain.close()


def test_flower_sees_every_job_of_a_batch_as_sent(broker, producer, flower):
    """A batch's task-sent events (one list message routed task.multi on RabbitMQ, one event
    per job in each queue's transaction on Redis) reach Flower as one task each."""
    from producers import Job

    # Events are not kept for a receiver that is not listening yet (Redis pub/sub; on RabbitMQ
    # Flower's queue is bound when it starts): a single job Flower shows says it listens.
    probes: list[str] = []

    def listening() -> bool:
        probes.append(producer.enqueue("search.index", ["doc-probe"]).id)
        return any(p in (flower.tasks() or {}) for p in probes)

    wait_until(listening, 60, interval=1.0, message="flower receiving events")
    results = producer.enqueue_many([Job("search.index", [f"doc-{i}"]) for i in range(5)])
    ids = [r.id for r in results]
    assert all(r.state == "queued" for r in results), results
    got = wait_until(lambda: (t := flower.tasks()) and all(i in t for i in ids) and t, 60,
                     interval=0.5, message="five sent tasks in flower")
    assert {got[i]["name"] for i in ids} == {"search.index"}
    assert all(got[i]["sent"] for i in ids), got
