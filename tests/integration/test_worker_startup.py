"""``celery -A workers worker`` with a bad setting, policy file or queue: one line, exit 2.

Each case is a real ``celery`` subprocess against a broker port nothing listens on: the
mistake must stop it before it connects anywhere, with the cause on one line and no traceback.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import BIN, free_port

pytestmark = pytest.mark.integration


def celery(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    return subprocess.run([str(BIN / "celery"), "-A", "workers", "worker", "-P", "solo", *argv],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TIDEGATE_BROKER_URL": dead,
                               "TIDEGATE_REDIS_URL": dead, **env})


def one_line(out: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert out.returncode == 2, out
    assert out.stderr.startswith("celery: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for text in expected:
        assert text in out.stderr, out.stderr


def test_bad_setting():
    one_line(celery("-Q", "payments", TIDEGATE_CONNECT_TIMEOUT_S="abc"),
             "TIDEGATE_CONNECT_TIMEOUT_S")


def test_bad_policy_file(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text('[dependencies.inventory]\nurl = "http://127.0.0.1:1"\ntimout_ms = 3\n')
    one_line(celery("-Q", "inventory", TIDEGATE_POLICY_FILE=str(path)),
             "[dependencies.inventory.timout_ms]: unknown key; did you mean 'timeout_ms'?")


@pytest.mark.parametrize(("argv", "expected"), [
    (["-Q", "nosuchqueue"], "-Q nosuchqueue: unknown queue; known: default, email, payments"),
    (["-Q", "payments,serch"], "-Q serch: unknown queue; did you mean 'search'?"),
    (["-X", "emial"], "-X emial: unknown queue; did you mean 'email'?"),
])
def test_queue_missing_from_the_policy_file(argv, expected):
    one_line(celery(*argv), expected)
