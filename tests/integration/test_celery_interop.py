"""Stock Celery tools and producers against real Tidegate workers, with no Tidegate config.

``celery --broker=URL inspect ...`` without ``-A workers`` and a bare ``Celery(broker=URL)``
producer use kombu's defaults (on Redis: its separator and priority lists), so Tidegate's
workers must read and write exactly those.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import redis
from celery import Celery

from tests.conftest import STATE_REDIS_URL
from tests.support.procs import BIN, wait_until
from workers.depth import probe_for

pytestmark = pytest.mark.integration


def plain_send(broker, app: Celery, name: str, args: list, priority: int) -> str:
    """``send_task`` from a Celery app that knows nothing of Tidegate.

    On RabbitMQ the queue is not declared again: RabbitMQ refuses (406) a declaration whose
    arguments differ from the existing queue's (Tidegate's carry x-max-priority and the DLX),
    so a plain producer publishes to the queue's exchange (docs/delivery.md).
    """
    where = ({"queue": "search"} if broker.name == "redis"
             else {"exchange": "search", "routing_key": "search"})
    return app.send_task(name, args=args, priority=priority, **where).id


def celery_cli(broker_url: str, *argv: str, cwd) -> subprocess.CompletedProcess:
    """The stock ``celery`` command, without ``-A``: Celery's default app and kombu defaults."""
    return subprocess.run([str(BIN / "celery"), f"--broker={broker_url}", *argv],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_plain_celery_producer_at_every_priority(broker, settings, sims, start_worker, tmp_path):
    """A bare Celery app's send_task at priorities 0-9: counted by depth, run by the workers
    under the same protection as Tidegate's own messages (idempotency marks)."""
    plain = Celery("plain", broker=broker.url)
    try:
        ids = {plain_send(broker, plain, "search.index", [f"plain-{p}"], p): p
               for p in range(10)}
    finally:
        plain.close()
    # A plain app publishes without confirms: the last messages may still be on their way.
    wait_until(lambda: probe_for(settings).depth("search").ready == 10, 30,
               message="the 10 plain messages counted")
    shown = subprocess.run([str(BIN / "tidegate"), "depth", "--json"], capture_output=True,
                           text=True, timeout=120, env={
                               **__import__("os").environ,
                               "TIDEGATE_BROKER_URL": broker.url,
                               "TIDEGATE_REDIS_URL": STATE_REDIS_URL,
                               "TIDEGATE_POLICY_FILE": str(settings.policy_file)})
    assert shown.returncode == 0, shown.stderr
    row = next(q for q in json.loads(shown.stdout)["queues"] if q["name"] == "search")
    assert row["ready"] == 10

    worker = start_worker("search")
    wait_until(lambda: sims["search"].ledger()["applied"] == 10, 60,
               message="10 plainly published documents indexed")
    assert sorted(sims["search"].ledger()["effects"]) == sorted(f"index:plain-{p}"
                                                                  for p in range(10))
    state = redis.Redis.from_url(STATE_REDIS_URL)
    marks = {tid: json.loads(state.get(f"tidegate:idem:search.index:task:{tid}") or "{}")
             for tid in ids}
    assert {m.get("s") for m in marks.values()} == {"done"}, marks
    wait_until(lambda: probe_for(settings).depth("search").ready == 0, 10,
               message="search drained")
    assert "Control command error" not in worker.output()


def test_stock_celery_commands_answer_without_app(broker, start_worker, tmp_path):
    """``celery --broker=URL inspect ping|active|stats`` and ``status`` with no ``-A``."""
    worker = start_worker("search")
    ping = celery_cli(broker.url, "inspect", "ping", "-d", worker.node, "--timeout", "10",
                      cwd=tmp_path)
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    active = celery_cli(broker.url, "inspect", "active", "-d", worker.node, "--timeout", "10",
                        "--json", cwd=tmp_path)
    assert active.returncode == 0, active.stdout + active.stderr
    assert json.loads(active.stdout.strip().splitlines()[-1]) == {worker.node: []}
    stats = celery_cli(broker.url, "inspect", "stats", "-d", worker.node, "--timeout", "10",
                       "--json", cwd=tmp_path)
    assert stats.returncode == 0, stats.stdout + stats.stderr
    doc = json.loads(stats.stdout.strip().splitlines()[-1])[worker.node]
    assert doc["broker"]["transport"] in ("redis", "amqp", "workers.transport:Transport")
    status = celery_cli(broker.url, "status", "--timeout", "10", cwd=tmp_path)
    assert status.returncode == 0 and f"{worker.node}: OK" in status.stdout, (
        status.stdout + status.stderr)
    assert "Control command error" not in worker.output()
