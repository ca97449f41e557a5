"""Helpers for the delivery-semantics tests: a fast policy file, DLQ and mark readers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STATE_REDIS_URL, tidegate_env
from tests.support.procs import BIN, ROOT

# Retries in milliseconds, breakers that only open when a test forces them, and a payments
# timeout long enough to SIGKILL a worker while a charge is in flight.
POLICY = """
[dependencies.payments]
queue = "payments"
url = "{payments}"
tasks = ["payments.*"]
idempotent = false
timeout_ms = {payments_timeout_ms}
deadline_ms = {payments_deadline_ms}
[dependencies.payments.breaker]
minimum_calls = 100000
[dependencies.payments.fallback]
kind = "graceful"
message = "Payments are temporarily unavailable; you have not been charged."

[dependencies.pricing]
queue = "payments"
url = "{pricing}"
tasks = []
idempotent = true
timeout_ms = 300
deadline_ms = 600
[dependencies.pricing.breaker]
minimum_calls = 100000
[dependencies.pricing.fallback]
kind = "cached"
ttl_s = 300

[dependencies.search]
queue = "search"
url = "{search}"
tasks = ["search.*"]
idempotent = true
timeout_ms = {search_timeout_ms}
deadline_ms = {search_deadline_ms}
[dependencies.search.retry]
base_s = 0.05
max_wait_s = 0.3
[dependencies.search.breaker]
minimum_calls = 100000
[dependencies.search.fallback]
kind = "default"

[dependencies.email]
queue = "email"
url = "{email}"
tasks = ["email.*"]
idempotent = true
timeout_ms = {email_timeout_ms}
deadline_ms = {email_deadline_ms}
[dependencies.email.retry]
base_s = 0.05
max_wait_s = 0.3
[dependencies.email.breaker]
minimum_calls = 100000
[dependencies.email.fallback]
kind = "queue"
"""

# soft < hard < visibility (Settings.check); small so Redis redelivers a killed worker's tasks
LIMITS = {"TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "20", "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "25",
          "TIDEGATE_VISIBILITY_TIMEOUT_S": "30"}


def write_policy(path: Path, sims: dict, **overrides: Any) -> Path:
    values = {"payments_timeout_ms": 1000, "payments_deadline_ms": 2000,
              "search_timeout_ms": 1000, "search_deadline_ms": 2000,
              "email_timeout_ms": 500, "email_deadline_ms": 1000, **overrides}
    path.write_text(POLICY.format(**{n: s.url for n, s in sims.items()}, **values))
    return path


@pytest.fixture
def fast_policy(sims, tmp_path: Path) -> Path:
    return write_policy(tmp_path / "fast-policy.toml", sims)


@pytest.fixture
def worker_env(fast_policy: Path) -> dict[str, str]:
    """Env for workers of these tests (no SQS: queue-for-later has no store unless added)."""
    return {"TIDEGATE_POLICY_FILE": str(fast_policy), **LIMITS}


def dead_letters(celery_app, queue: str) -> list:
    from workers.deadletter import DeadLetters

    return DeadLetters(celery_app).list(queue)


def wait_dead(celery_app, queue: str, n: int = 1, timeout: float = 60.0) -> list:
    from tests.support.procs import wait_until

    return wait_until(lambda: (r := dead_letters(celery_app, queue)) and len(r) >= n and r,
                      timeout, interval=0.2, message=f"{n} record(s) in {queue}.dlq")


def marks(state_redis, task: str) -> dict[str, dict]:
    """The idempotency marks of ``task``: {mark key: record}."""
    prefix = f"tidegate:idem:{task}:"
    out = {}
    for key in state_redis.scan_iter(match=prefix + "*"):
        out[key.decode()[len(prefix):]] = json.loads(state_redis.get(key))
    return out


def force_breaker(settings, fast_policy: Path, dependency: str, state: str,
                  seconds: float = 600) -> None:
    """Open ``dependency``'s shared circuit for ``seconds`` (every worker sees it), or close it.

    Workers hold an open state locally until its retry-after passes, so a test that wants
    the circuit to heal opens it briefly instead of closing it by hand.
    """
    from workers.policies import build_state
    from workers.topology import load_topology

    local = settings.model_copy(update={"policy_file": fast_policy, "redis_url": STATE_REDIS_URL})
    breaker = build_state(local, load_topology(fast_policy)).registry.breaker(dependency)
    if state == "open":
        breaker.force_open(seconds)
    else:
        breaker.reset()


def cli(broker, policy_file: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, **tidegate_env(broker, policy_file)}
    return subprocess.run([str(BIN / "tidegate"), *argv], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
