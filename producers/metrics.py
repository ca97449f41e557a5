"""Prometheus metrics of the producing side (default registry, safe to import twice)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from resilience.metrics import get_or_create

__all__ = ["API_LANE", "API_LOAD", "ENQUEUED", "HTTP_REQUESTS", "REFUSED", "THROTTLE_WAIT",
           "refused"]

ENQUEUED = get_or_create(
    Counter, "tidegate_producer_enqueued_total",
    "Jobs accepted by producers, by queue, priority and state (queued, deferred).",
    ("queue", "priority", "state"))
REFUSED = get_or_create(
    Counter, "tidegate_producer_refused_total",
    "Jobs refused by producers, by reason (backpressure, rate_limited, broker_unavailable).",
    ("queue", "priority", "reason"))
THROTTLE_WAIT = get_or_create(
    Histogram, "tidegate_producer_throttle_wait_seconds",
    "Time a throttled enqueue waited for admission (admitted or finally refused).",
    ("queue",), buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
HTTP_REQUESTS = get_or_create(
    Counter, "tidegate_api_requests_total",
    "HTTP API responses by route and status code.", ("route", "status"))
API_LANE = get_or_create(
    Gauge, "tidegate_api_publish_lane",
    "The HTTP API's publish lane: jobs publishing (state=running) and waiting for a thread.",
    ("state",))
API_LOAD = get_or_create(
    Gauge, "tidegate_api_load",
    "The HTTP API process's load as its overload shedder sees it: loop_lag_seconds (how late "
    "a 10 ms timer runs) and cpu_share (CPU seconds per wall second over ~200 ms).",
    ("measure",))


@functools.lru_cache(maxsize=1024)
def refused(queue: str, priority: str, reason: str) -> Counter:
    """``REFUSED``'s child for these labels, looked up once (``labels()`` takes a lock and
    builds a tuple: a noticeable share of a refusal answered on the API's event loop)."""
    return REFUSED.labels(queue=queue, priority=priority, reason=reason)
