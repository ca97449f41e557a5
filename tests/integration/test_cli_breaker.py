"""``tidegate breaker``: an operator forces a shared breaker, and a worker's breaker follows."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from resilience.breaker import BreakerState, CircuitBreaker
from resilience.errors import CircuitOpen
from resilience.policy import PolicyConfig
from resilience.stores import RedisStore, redis_client
from tests.conftest import STATE_REDIS_URL
from tests.support.procs import BIN, free_port, wait_until

pytestmark = pytest.mark.integration


def run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tidegate"), "breaker", *argv], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "TIDEGATE_REDIS_URL": STATE_REDIS_URL, **env})


def test_open_and_close_reach_a_running_breaker(state_redis, policy_file):
    env = {"TIDEGATE_POLICY_FILE": str(policy_file)}
    cfg = PolicyConfig.from_mapping("payments", {}).breaker
    worker_side = CircuitBreaker("payments", cfg, RedisStore(redis_client(
        STATE_REDIS_URL, socket_timeout=1, socket_connect_timeout=1)))
    worker_side.record(worker_side.acquire(), None, 0.001)
    assert worker_side.state is BreakerState.CLOSED

    out = run("open", "payments", "--for", "120", "--json", **env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["state"] == "open"

    def refused() -> bool:
        try:
            worker_side.record(worker_side.acquire(), None, 0.001)
        except CircuitOpen as exc:
            return exc.retry_after > 60  # the forced duration, not the default
        return False

    wait_until(refused, 10, message="the worker's breaker sees the forced open")

    out = run("close", "payments", **env)
    assert out.returncode == 0 and "payments: closed" in out.stdout, out
    # seen within about a second (OPEN_RECHECK_S), long before the 120 s run out
    wait_until(lambda: not refused(), 10, message="the worker's breaker sees the forced close")
    listed = {r["dependency"]: r["state"] for r in json.loads(run("list", "--json", **env).stdout)}
    assert listed["payments"] == "closed" and set(listed) >= {"payments", "search", "email"}


def test_bad_name_and_unreachable_store_are_one_line_errors(policy_file):
    env = {"TIDEGATE_POLICY_FILE": str(policy_file)}
    out = run("close", "nope", **env)
    assert out.returncode == 2 and "unknown dependency 'nope'" in out.stderr, out
    down = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    out = run("list", TIDEGATE_REDIS_URL=down, **env)
    assert out.returncode == 3 and "state store unreachable" in out.stderr, out
    assert "hunter2" not in out.stderr and "Traceback" not in out.stderr
