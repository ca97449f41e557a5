"""Prometheus metrics: a subscriber to the layers' events (:mod:`resilience.events`).

No layer touches a metric: each emits events, and :func:`on_event` turns them into the
``tidegate_*`` series on the default registry. Attempt durations arrive in batches (see
:mod:`resilience.callstats`) and feed ``tidegate_call_duration_seconds``, a custom collector
(prometheus-client has no bulk ``observe``; one ``Histogram.observe`` per call would cost more
than the rest of the chain) registered through the registry's public ``register``.

:func:`get_or_create` lets other modules (workers/, producers/) declare metrics that survive
being declared twice (a module run as ``__main__`` and imported as well).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from . import events as ev
from .callstats import fold_all

__all__ = [
    "BREAKER_STATE",
    "BREAKER_TRANSITIONS",
    "BUCKETS",
    "CALLS",
    "CONCURRENCY_IN_FLIGHT",
    "CONCURRENCY_LIMIT",
    "DEFERRALS",
    "FALLBACKS",
    "HEDGES",
    "LATENCY_BASELINE",
    "REJECTIONS",
    "RETRIES",
    "SHEDS",
    "STORE_DEGRADED",
    "STORE_ERRORS",
    "Counter",
    "DurationCollector",
    "Gauge",
    "get_or_create",
    "on_event",
    "subscribe",
]

log = logging.getLogger(__name__)

_made: dict[str, Any] = {}
_made_lock = threading.Lock()


def get_or_create(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw):
    """The metric declared as ``name``, created (and registered) on first use."""
    with _made_lock:
        existing = _made.get(name)
        if existing is not None:
            return existing
        base = name[: -len("_total")] if kind is Counter and name.endswith("_total") else name
        try:
            metric = kind(base, doc, labels, **kw)
        except ValueError:  # registered by another copy of this module (a reload): keep going
            log.warning("metric %s is already registered; this copy is not exported", name)
            metric = kind(base, doc, labels, registry=None, **kw)
        _made[name] = metric
        return metric


# --------------------------------------------------------------------------- call durations

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.08, 0.1, 0.16, 0.25, 0.5, 1, 2.5, 5)
DURATION = "tidegate_call_duration_seconds"
DURATION_DOC = "Duration of one attempt against the dependency, in seconds."


class _Totals:
    """Cumulative histogram of one dependency."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.lock = threading.Lock()

    def add(self, durations: list[float]) -> None:
        durations.sort()
        edges = [bisect.bisect_right(durations, b) for b in BUCKETS]  # le semantics
        with self.lock:
            prev = 0
            for i, edge in enumerate(edges):
                self.counts[i] += edge - prev
                prev = edge
            self.counts[-1] += len(durations) - prev
            self.total += sum(durations)

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        with self.lock:
            counts, total = list(self.counts), self.total
        cumulative, running = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return cumulative, total


class DurationCollector(Collector):
    """``tidegate_call_duration_seconds`` from batched durations.

    ``collect`` folds every policy's pending records first (:func:`~resilience.callstats.
    fold_all`). It is registered before the counters below and the registry collects in
    registration order, so a scrape's success counter is folded before it is read.
    """

    def __init__(self) -> None:
        self._totals: dict[str, _Totals] = {}
        self._lock = threading.Lock()

    def add(self, dependency: str, durations: tuple[float, ...]) -> None:
        totals = self._totals.get(dependency)
        if totals is None:
            with self._lock:
                totals = self._totals.setdefault(dependency, _Totals())
        totals.add(list(durations))

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(DURATION, DURATION_DOC, labels=("dependency",))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fold_all()
        family = HistogramMetricFamily(DURATION, DURATION_DOC, labels=("dependency",))
        with self._lock:
            items = sorted(self._totals.items())
        for dependency, totals in items:
            buckets, total = totals.snapshot()
            family.add_metric([dependency], buckets, total)
        yield family


DURATIONS = DurationCollector()
try:
    REGISTRY.register(DURATIONS)
except ValueError:  # another copy of this module registered it first (a reload)
    log.warning("%s is already registered; this copy is not exported", DURATION)

# --------------------------------------------------------------------------- the series

CALLS = get_or_create(
    Counter,
    "tidegate_calls_total",
    "Guarded calls by outcome (success, failure, rejected, fallback, timeout).",
    ("dependency", "outcome"),
)
BREAKER_STATE = get_or_create(
    Gauge,
    "tidegate_breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
    ("dependency",),
)
BREAKER_TRANSITIONS = get_or_create(
    Counter,
    "tidegate_breaker_transitions_total",
    "Circuit breaker state changes seen by this process.",
    ("dependency", "from_state", "to_state"),
)
REJECTIONS = get_or_create(
    Counter,
    "tidegate_rejections_total",
    "Calls refused before reaching the dependency, by reason.",
    ("dependency", "reason"),
)
SHEDS = get_or_create(
    Counter,
    "tidegate_sheds_total",
    "Requests shed under load, by priority.",
    ("priority",),
)
RETRIES = get_or_create(
    Counter,
    "tidegate_retries_total",
    "Retry attempts started (attempt 2 onward).",
    ("dependency",),
)
FALLBACKS = get_or_create(
    Counter,
    "tidegate_fallbacks_total",
    "Fallback results served, by kind.",
    ("dependency", "kind"),
)
DEFERRALS = get_or_create(
    Counter,
    "tidegate_deferrals_total",
    "Requests queued for later, by result (stored, failed, refused: deferred too often).",
    ("dependency", "result"),
)
STORE_DEGRADED = get_or_create(
    Gauge,
    "tidegate_state_store_degraded",
    "1 while the shared state store is unreachable and local state is used instead.",
    ("store",),
)
STORE_ERRORS = get_or_create(
    Counter,
    "tidegate_state_store_errors_total",
    "Failed calls to the shared state store.",
    ("store", "operation"),
)

CONCURRENCY_LIMIT = get_or_create(
    Gauge,
    "tidegate_concurrency_limit",
    "Adaptive concurrency limit of this process for the dependency.",
    ("dependency",),
)
CONCURRENCY_IN_FLIGHT = get_or_create(
    Gauge,
    "tidegate_concurrency_in_flight",
    "Calls in flight under the adaptive limit (sampled as the limit reports).",
    ("dependency",),
)
LATENCY_BASELINE = get_or_create(
    Gauge,
    "tidegate_latency_baseline_seconds",
    "The adaptive limit's latency baseline (windowed minimum of the short-term average).",
    ("dependency",),
)

HEDGES = get_or_create(
    Counter,
    "tidegate_hedges_total",
    "Hedged attempts: started, refused (no retry budget), won (their answer was used).",
    ("dependency", "result"),
)

HEDGE_DELAY = get_or_create(
    Gauge,
    "tidegate_hedge_delay_seconds",
    'The delay before a hedge under hedge.delay = "p95" (the observed percentile).',
    ("dependency",),
)

_GAUGE = {"closed": 0, "half_open": 1, "open": 2}


# --------------------------------------------------------------------------- the subscriber


def _transition(e: ev.StateTransition) -> None:
    BREAKER_STATE.labels(dependency=e.dependency).set(_GAUGE[e.to_state])
    if e.from_state is not None:
        BREAKER_TRANSITIONS.labels(
            dependency=e.dependency, from_state=e.from_state, to_state=e.to_state).inc()


def _shed(e: ev.LoadShed) -> None:
    SHEDS.labels(priority=e.priority).inc()
    if e.dependency:
        REJECTIONS.labels(dependency=e.dependency, reason=e.reason).inc()


def _concurrency(e: ev.ConcurrencyLimit) -> None:
    CONCURRENCY_LIMIT.labels(dependency=e.dependency).set(e.limit)
    CONCURRENCY_IN_FLIGHT.labels(dependency=e.dependency).set(e.in_flight)
    LATENCY_BASELINE.labels(dependency=e.dependency).set(e.baseline)


def _durations(e: ev.AttemptDurations) -> None:
    DURATIONS.add(e.dependency, e.durations)
    if e.successes:
        CALLS.labels(dependency=e.dependency, outcome="success").inc(e.successes)


_HANDLERS: dict[type[ev.Event], Any] = {
    ev.StateTransition: _transition,
    ev.Rejected: lambda e: REJECTIONS.labels(dependency=e.dependency, reason=e.reason).inc(),
    ev.LoadShed: _shed,
    ev.RetryScheduled: lambda e: RETRIES.labels(dependency=e.dependency).inc(),
    ev.FallbackServed: lambda e: FALLBACKS.labels(dependency=e.dependency, kind=e.kind).inc(),
    ev.DeferralAttempted: lambda e: DEFERRALS.labels(
        dependency=e.dependency, result=e.result).inc(),
    ev.CallFinished: lambda e: CALLS.labels(dependency=e.dependency, outcome=e.outcome).inc(),
    ev.AttemptDurations: _durations,
    ev.ConcurrencyLimit: _concurrency,
    ev.Hedged: lambda e: HEDGES.labels(dependency=e.dependency, result=e.result).inc(),
    ev.HedgeDelaySet: lambda e: HEDGE_DELAY.labels(dependency=e.dependency).set(e.seconds),
    ev.StoreDegraded: lambda e: STORE_DEGRADED.labels(store=e.store).set(int(e.degraded)),
    ev.StoreFailed: lambda e: STORE_ERRORS.labels(store=e.store, operation=e.operation).inc(),
}


def on_event(event: ev.Event) -> None:
    """Count one event into the series above (events of other types are ignored)."""
    handler = _HANDLERS.get(type(event))
    if handler is not None:
        handler(event)


def subscribe(bus: ev.EventBus = ev.EVENTS):
    """Feed the series from ``bus``; returns the unsubscribe function."""
    return bus.subscribe(on_event, *_HANDLERS)
