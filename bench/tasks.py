"""No-op tasks for the pipeline benchmark: one plain Celery task and two resilient ones.

Both count their completion in Redis (the same cost for both), so the benchmark can tell
when a run is done without a result backend.
"""

from __future__ import annotations

import functools
import os

import redis
from celery import shared_task

from workers.resilient import resilient_task

COUNTER = "tidegate:bench:done"


@functools.cache
def _counter() -> redis.Redis:
    return redis.Redis.from_url(os.environ["TIDEGATE_REDIS_URL"], socket_timeout=5,
                                socket_connect_timeout=2)


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
