"""What the chain records about each call, for one ``deque.append`` on the success path.

Every guarded call feeds four consumers: the attempt-duration histogram and the success
counter (Prometheus), the latency window behind the seed's "timeout = P99 x 2", and the retry
budget's request count. Fed one by one they cost more than the rest of the chain together
(prometheus-client's ``Histogram.observe`` alone takes a lock and walks every bucket, about
0.8 us). So a success only appends its duration to a deque (one C call, thread-safe without a
lock), and :meth:`CallStats.fold` hands the backlog to all four in bulk: at most every
``fold_interval`` seconds from the calling thread, and always before anything reads them - a
Prometheus scrape (the collector folds first), a percentile, a retry decision.

The histogram is exposed by :class:`DurationCollector`, a prometheus-client custom collector
(``HistogramMetricFamily``), because the library has no bulk ``observe``. Totals live per
dependency name for the life of the process, like a labelled child would.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from .latency import LatencyRecorder

__all__ = ["BUCKETS", "CallStats", "DurationCollector", "fold_all"]

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.08, 0.1, 0.16, 0.25, 0.5, 1, 2.5, 5)
METRIC = "tidegate_call_duration_seconds"
DOC = "Duration of one attempt against the dependency, in seconds."


class _Totals:
    """Cumulative histogram of one dependency (all of its CallStats add here)."""

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


_totals: dict[str, _Totals] = {}
_totals_lock = threading.Lock()
_live: weakref.WeakSet[CallStats] = weakref.WeakSet()


def _totals_for(dependency: str) -> _Totals:
    with _totals_lock:
        t = _totals.get(dependency)
        if t is None:
            t = _totals[dependency] = _Totals()
        return t


class CallStats:
    """One policy's call records: appended per call, folded in bulk (see module docstring)."""

    def __init__(
        self,
        dependency: str,
        *,
        on_successes: Iterable[Callable[[int], Any]] = (),
        latency: LatencyRecorder | None = None,
        fold_interval: float = 0.1,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dependency = dependency
        self.latency = latency or LatencyRecorder()
        self.fold_interval = fold_interval
        self._now = now
        self._on_successes = tuple(on_successes)  # each gets the number of successes folded
        self._successes: deque[float] = deque()
        self._others: deque[float] = deque()
        self._totals = _totals_for(dependency)
        self._lock = threading.Lock()
        self.fold_at = now() + fold_interval  # the hot path compares its clock with this
        self.success = self._successes.append  # hot path: a success's attempt duration
        _live.add(self)

    def other(self, seconds: float) -> None:
        """An attempt that did not succeed (its duration still belongs in the histogram)."""
        self._others.append(seconds)

    def fold(self) -> None:
        """Hand everything recorded so far to the histogram, counters, window and budget."""
        with self._lock:
            self.fold_at = self._now() + self.fold_interval
            s, o = self._successes, self._others
            # popleft is atomic: appends racing with the fold land in the next one
            ok = [s.popleft() for _ in range(len(s))]
            other = [o.popleft() for _ in range(len(o))]
            if not ok and not other:
                return
            self.latency.extend(ok)
            self.latency.extend(other)
            self._totals.add(ok + other)
        if ok:
            for consumer in self._on_successes:
                consumer(len(ok))


def fold_all() -> None:
    """Fold every live CallStats (a scrape is about to read them)."""
    for stats in list(_live):
        stats.fold()


class DurationCollector(Collector):
    """Exposes ``tidegate_call_duration_seconds`` from the folded totals.

    Its ``collect`` folds every policy's records first. It is registered before the other
    Tidegate metrics (:mod:`resilience.metrics` imports this module first) and the registry
    collects in registration order, so a scrape's success counter is folded before it is read.
    """

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(METRIC, DOC, labels=("dependency",))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fold_all()
        family = HistogramMetricFamily(METRIC, DOC, labels=("dependency",))
        with _totals_lock:
            items = list(_totals.items())
        for dependency, totals in sorted(items):
            buckets, total = totals.snapshot()
            family.add_metric([dependency], buckets, total)
        yield family


def _register() -> None:
    names = REGISTRY._names_to_collectors  # re-import safe, as metrics.get_or_create
    if f"{METRIC}_bucket" not in names and METRIC not in names:
        REGISTRY.register(DurationCollector())


_register()
