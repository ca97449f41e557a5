"""An idle worker honours SIGTERM (warm shutdown) promptly on every broker.

kombu's event loop sleeps in poll() until its next timer (up to 10 s); on RabbitMQ an idle
worker took 8-10 s to notice a SIGTERM until workers.wakeup bounded that sleep to 1 s.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.procs import wait_until

pytestmark = pytest.mark.integration


def test_an_idle_worker_stops_within_seconds_of_sigterm(broker, start_worker):
    worker = start_worker("search")
    started = time.monotonic()
    worker.kill(signal.SIGTERM)
    wait_until(lambda: not worker.alive(), 30, message="the worker exits after SIGTERM")
    took = time.monotonic() - started
    assert "Warm shutdown" in worker.output()
    assert took < 5, f"warm shutdown took {took:.1f} s: the event loop slept through it"
