"""Prometheus metrics for every pattern, on the default registry.

Per-call records of the chain's success path (attempt durations, successes) are batched in
:mod:`resilience.callstats`; everything else is counted where it happens.

Importing this module twice (e.g. under two module names, or after a test reload) must not
raise "Duplicated timeseries": collectors are looked up in the registry before being created.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

# Registers tidegate_call_duration_seconds, a custom collector that folds every policy's
# per-call records (successes included) when collected: it must be registered before the
# counters below, because the registry collects in registration order.
from . import callstats as _callstats  # noqa: F401

__all__ = [
    "BREAKER_STATE",
    "BREAKER_TRANSITIONS",
    "CALLS",
    "DEFERRALS",
    "FALLBACKS",
    "REJECTIONS",
    "RETRIES",
    "SHEDS",
    "STORE_DEGRADED",
    "STORE_ERRORS",
    "get_or_create",
]


def get_or_create(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw):
    """The collector registered under ``name``, created on first use: a module that declares
    metrics can be imported twice (tests, reloads) without a duplicate-timeseries error."""
    registry: CollectorRegistry = REGISTRY
    existing = registry._names_to_collectors.get(name)
    if existing is None and kind is Counter:
        existing = registry._names_to_collectors.get(f"{name}_total")
    if existing is not None:
        return existing
    base = name[: -len("_total")] if kind is Counter and name.endswith("_total") else name
    return kind(base, doc, labels, registry=registry, **kw)


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
