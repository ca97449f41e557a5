"""``tidegate deferred list`` and ``redrive`` never harm what the deferral queues hold.

A real SQS endpoint (moto server). Listing used to receive every entry shown, which counts
toward the redrive policy's maxReceiveCount: a few listings moved deferred requests to the
DLQ. Here maxReceiveCount is 2, and 100 listings (and 100 peeks) move none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resilience.fallback import DeferredRequest
from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL, sqs_env
from tests.support.procs import BIN

pytestmark = pytest.mark.integration
KEYS = [f"order-{i}" for i in range(3)]


def _env(policy_file, moto, prefix, receives: int) -> dict[str, str]:
    return {**sqs_env(moto, prefix), "TIDEGATE_BROKER_URL": REDIS_BROKER_URL,
            "TIDEGATE_REDIS_URL": STATE_REDIS_URL, "TIDEGATE_POLICY_FILE": str(policy_file),
            "TIDEGATE_DEFERRAL_MAX_RECEIVE_COUNT": str(receives),
            "TIDEGATE_DEFERRAL_QUEUE_PREFIX": prefix}


def _store(env: dict[str, str]):
    from workers.deferral import store_for
    from workers.settings import load_settings

    settings = load_settings(
        broker_url=env["TIDEGATE_BROKER_URL"], redis_url=env["TIDEGATE_REDIS_URL"],
        policy_file=env["TIDEGATE_POLICY_FILE"], sqs_endpoint_url=env["TIDEGATE_SQS_ENDPOINT_URL"],
        aws_access_key_id="testing", aws_secret_access_key="testing",
        deferral_queue_prefix=env["TIDEGATE_DEFERRAL_QUEUE_PREFIX"],
        deferral_max_receive_count=int(env["TIDEGATE_DEFERRAL_MAX_RECEIVE_COUNT"]))
    return store_for("email", settings)


def _defer(store) -> None:
    for key in KEYS:
        store.defer(DeferredRequest("email", "email.send", (f"{key}@example.com", "hi"), {},
                                    idempotency_key=key, priority=2, reason="circuit_open"))


def _keys_left(store) -> list[str]:
    """Every entry's key (received once at the very end, then released)."""
    entries = store.peek(10, hold_s=1)
    return sorted(e.request.idempotency_key for e in entries)


def _cli_many(env: dict[str, str], argv: list[str], times: int) -> list[dict]:
    """Run ``tidegate ARGV`` ``times`` in one fresh process (CliRunner); the JSON outputs."""
    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from tidegate.cli import app\n"
        "runner, argv, out = CliRunner(), json.loads(sys.argv[1]), []\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    r = runner.invoke(app, argv)\n"
        "    assert r.exit_code == 0, (r.exit_code, r.output, r.exception)\n"
        "    out.append(json.loads(r.stdout.strip().splitlines()[-1]))\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argv), str(times)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_listing_100_times_moves_nothing_to_the_dlq(policy_file, moto_sqs, deferral_prefix):
    env = _env(policy_file, moto_sqs, deferral_prefix, receives=2)
    store = _store(env)
    _defer(store)
    listed = _cli_many(env, ["deferred", "list", "email", "--json"], 100)
    assert {(d["visible"], d["dead_letter"], d["peeked"]) for d in listed} == {(3, 0, False)}
    # peeking receives, but stores each entry again: its receive count starts over
    peeked = _cli_many(env, ["deferred", "list", "email", "--peek", "5", "--json"], 100)
    assert all(sorted(e["idempotency_key"] for e in d["entries"]) == KEYS for d in peeked)
    assert all(e["receive_count"] == 1 for d in peeked for e in d["entries"])
    stats = store.stats()
    assert (stats.total, stats.dead) == (3, 0), stats
    assert _keys_left(store) == KEYS


def test_redrive_moves_dead_letters_back(policy_file, moto_sqs, deferral_prefix):
    env = _env(policy_file, moto_sqs, deferral_prefix, receives=1)
    store = _store(env)
    _defer(store)
    for _ in range(3):  # past maxReceiveCount 1: SQS moves them to the DLQ on a receive
        store.release(store.receive(10, visibility_timeout=30))
        if store.stats().dead == 3:
            break
    assert store.stats().dead == 3, store.stats()
    out = subprocess.run([str(BIN / "tidegate"), "deferred", "redrive", "email"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["moved"] == 3 and not result.get("twins") and not result.get("failed"), result
    stats = store.stats()
    assert (stats.visible, stats.dead) == (3, 0), stats
    assert _keys_left(store) == KEYS
