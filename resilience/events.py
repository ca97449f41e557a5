"""Typed events every layer emits, and the bus that hands them to subscribers.

Layers say what happened (a state transition, a retry, a rejection, a fallback, a deferral,
attempt durations) and nothing else: Prometheus metrics (:mod:`resilience.metrics`), logs
(:mod:`resilience.logs`) are subscribers, wired to the default bus :data:`EVENTS` when the
package is imported (tracing would be one more subscriber). A user adds their own with
``EVENTS.subscribe(listener, RetryScheduled)``, or gives a :class:`~resilience.policy.Policy`
its own :class:`EventBus`.

Successes are not events one by one (the success path cannot afford a dispatch per call):
:class:`AttemptDurations` reports them in batches, as :mod:`resilience.callstats` folds them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "EVENTS",
    "AttemptDurations",
    "CallFinished",
    "ConcurrencyLimit",
    "DeferralAttempted",
    "Event",
    "EventBus",
    "FallbackServed",
    "HedgeDelaySet",
    "Hedged",
    "Listener",
    "LoadShed",
    "Rejected",
    "RetryScheduled",
    "StateTransition",
    "StoreDegraded",
    "StoreFailed",
]

log = logging.getLogger(__name__)


class Event:
    """Base of every event (subscribe to it to hear them all)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StateTransition(Event):
    """A breaker changed state as this process sees it; ``from_state`` None: first seen."""

    dependency: str
    from_state: str | None
    to_state: str


@dataclass(frozen=True, slots=True)
class Rejected(Event):
    """A call refused before it reached the dependency (``reason``: the error's reason)."""

    dependency: str
    reason: str
    retry_after: float = 0.0


@dataclass(frozen=True, slots=True)
class LoadShed(Event):
    """A request shed under load; ``dependency`` None for a shedder without a name."""

    priority: str
    dependency: str | None
    reason: str
    load: float


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """Attempt ``attempt`` failed with ``error`` and another starts after ``wait`` seconds."""

    dependency: str
    attempt: int
    wait: float
    error: str


@dataclass(frozen=True, slots=True)
class FallbackServed(Event):
    dependency: str
    kind: str


@dataclass(frozen=True, slots=True)
class DeferralAttempted(Event):
    """Queue-for-later: ``result`` is stored, failed or refused (deferred too often)."""

    dependency: str
    result: str


@dataclass(frozen=True, slots=True)
class CallFinished(Event):
    """A call that did not end in a plain success: failure, rejected or fallback; also a
    success that needed more than one attempt (first-attempt successes come batched in
    :class:`AttemptDurations`)."""

    dependency: str
    outcome: str


@dataclass(frozen=True, slots=True)
class AttemptDurations(Event):
    """A batch of attempt durations (seconds), ``successes`` of them first-attempt successes."""

    dependency: str
    durations: tuple[float, ...]
    successes: int


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit(Event):
    """An adaptive limiter's state: sent when its limit moves, and every second or so while
    calls flow (``baseline`` seconds, 0 before the first sample)."""

    dependency: str
    limit: int
    in_flight: int
    baseline: float


@dataclass(frozen=True, slots=True)
class Hedged(Event):
    """A hedge ``started``, was ``refused`` (no retry budget), or ``won`` (its answer used)."""

    dependency: str
    result: str


@dataclass(frozen=True, slots=True)
class HedgeDelaySet(Event):
    """A ``hedge.delay = "p95"`` delay moved to ``seconds`` (the observed percentile)."""

    dependency: str
    seconds: float


@dataclass(frozen=True, slots=True)
class StoreDegraded(Event):
    """The shared state store became unreachable (``degraded``) or reachable again."""

    store: str
    degraded: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StoreFailed(Event):
    """One call to a state store (or cache) failed."""

    store: str
    operation: str


Listener = Callable[[Event], object]


class EventBus:
    """Listeners by event type. ``emit`` is a dict lookup and a loop; a failing listener is
    logged and never breaks the call that emitted."""

    def __init__(self) -> None:
        self._listeners: list[tuple[type[Event], Listener]] = []
        self._by_type: dict[type[Event], tuple[Listener, ...]] = {}
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener, *types: type[Event]) -> Callable[[], None]:
        """Call ``listener(event)`` for events of ``types`` (default: all); returns an
        unsubscribe function."""
        entries = [(t, listener) for t in (types or (Event,))]
        with self._lock:
            self._listeners.extend(entries)
            self._by_type = {}

        def unsubscribe() -> None:
            with self._lock:
                for entry in entries:
                    if entry in self._listeners:
                        self._listeners.remove(entry)
                self._by_type = {}

        return unsubscribe

    def _resolve(self, kind: type[Event]) -> tuple[Listener, ...]:
        with self._lock:
            found = tuple(fn for t, fn in self._listeners if issubclass(kind, t))
            self._by_type[kind] = found
        return found

    def emit(self, event: Event) -> None:
        listeners = self._by_type.get(type(event))
        if listeners is None:
            listeners = self._resolve(type(event))
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %r", listener, event)


EVENTS = EventBus()
"""The default bus: every layer emits here unless given its own."""
