"""No-op tasks for the benchmarks: one plain Celery task, resilient ones that succeed and two
whose dependency call always fails (bench/state_load.py).

Each counts its completion (or attempt) in Redis (the same cost for all), so a benchmark can
tell when a run is done without a result backend. ``TIDEGATE_BENCH_COUNTER_URL`` puts the
counter on a Redis of its own, so that it does not show in the state Redis' command counts.
"""

from __future__ import annotations

import functools
import os

import redis
from celery import shared_task

from resilience.errors import TransientError
from workers.resilient import resilient_task

COUNTER = "tidegate:bench:done"
ATTEMPTS = "tidegate:bench:attempts"


@functools.cache
def _counter() -> redis.Redis:
    url = os.environ.get("TIDEGATE_BENCH_COUNTER_URL") or os.environ["TIDEGATE_REDIS_URL"]
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def _noop(i: int) -> int:
    return i


@shared_task(name="bench.plain_noop")
def plain_noop(i: int) -> int:
    """Bare Celery: the baseline."""
    _counter().incr(COUNTER)
    return i


@resilient_task("bench.resilient_noop", dependency="search", idempotent=True)
def resilient_noop(self, i: int) -> int:
    """The same work through Tidegate's task base and the dependency's chain."""
    result = self.read("search", _noop, i)
    _counter().incr(COUNTER)
    return result


@resilient_task("bench.resilient_noop_once", dependency="search", idempotent=False)
def resilient_noop_once(self, i: int) -> int:
    """Not idempotent: the delivery reads and takes its idempotency mark before the call."""
    result = self.read("search", _noop, i)
    _counter().incr(COUNTER)
    return result


def _failing(i: int) -> int:
    _counter().incr(ATTEMPTS)
    raise TransientError(f"bench: the dependency refuses call {i}")


@resilient_task("bench.resilient_fail", dependency="search", idempotent=True)
def resilient_fail(self, i: int) -> int:
    """Idempotent, always failing: retried in the call and through the queue, then the DLQ."""
    return self.write("search", _failing, i)


@resilient_task("bench.resilient_fail_once", dependency="search", idempotent=False)
def resilient_fail_once(self, i: int) -> int:
    """Not idempotent, always failing: dead-lettered after its one attempt. Its effect is
    ``benchonce`` (idempotent = false), a dependency only bench/state_load.py's policy has."""
    return self.write("benchonce", _failing, i)
