"""The CLI answers bad input and unreachable brokers with one line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support.procs import BIN, free_port

pytestmark = pytest.mark.integration


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tidegate"), *argv], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("argv", "message"), [
    (["enqueue", "nope.task"], "unknown task 'nope.task'"),
    (["enqueue", "search.index", "--args", "[1,"], "--args is not valid JSON"),
    (["enqueue", "search.index", "--kwargs", "[]"], "--kwargs must be a JSON object"),
    (["enqueue", "search.index", "--priority", "urgent"], "unknown priority 'urgent'"),
    (["enqueue", "search.index", "--queue", "nope"], "unknown queue 'nope'"),
])
def test_bad_input(redis_up, argv, message):
    out = run(*argv)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("scheme", ["redis://127.0.0.1:{port}/0",
                                    "amqp://guest:secret-pw@127.0.0.1:{port}//"])
def test_unreachable_broker_fails_fast(scheme):
    url = scheme.format(port=free_port())  # nothing listens there
    started = time.monotonic()
    out = run("enqueue", "search.index", "--args", '["d"]', env={"TIDEGATE_BROKER_URL": url})
    assert out.returncode == 3, out
    assert "broker unreachable" in out.stderr and out.stderr.count("\n") == 1
    assert "secret-pw" not in out.stderr  # no password in the message
    assert time.monotonic() - started < 45  # bounded by the connect timeout, not a hang


def test_bad_setting_is_named():
    out = run("enqueue", "search.index", env={"TIDEGATE_BROKER_URL": "kafka://x"})
    assert out.returncode == 2 and "TIDEGATE_BROKER_URL" in out.stderr


@pytest.mark.parametrize("action", ["list", "replay"])
def test_unreachable_sqs_is_an_unavailable_store(action):
    """DeferralError (the SQS endpoint cannot be reached) exits 3, like a dead broker."""
    env = {"TIDEGATE_SQS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "TIDEGATE_AWS_ACCESS_KEY_ID": "test", "TIDEGATE_AWS_SECRET_ACCESS_KEY": "test",
           "TIDEGATE_SQS_MAX_ATTEMPTS": "1"}
    out = run("deferred", action, "email", env=env)
    assert out.returncode == 3, out
    assert out.stderr.count("\n") == 1 and "email" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
