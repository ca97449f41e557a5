"""What the chain records about each call, for one ``deque.append`` on the success path.

Every guarded call feeds the attempt-duration histogram and the success counter (subscribers
of :class:`~resilience.events.AttemptDurations`), the latency window behind the seed's
"timeout = P99 x 2", and the retry budget's request count. Fed one by one they cost more than
the rest of the chain together (prometheus-client's ``Histogram.observe`` alone takes a lock
and walks every bucket, about 0.8 us). So a success only appends its duration to a deque (one
C call, thread-safe without a lock), and :meth:`CallStats.fold` hands the backlog over in
bulk: at most every ``fold_interval`` seconds from the calling thread, and always before
anything reads it - a Prometheus scrape (the duration collector folds first), a percentile,
a retry decision.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .events import EVENTS, AttemptDurations, EventBus
from .latency import LatencyRecorder

__all__ = ["CallStats", "fold_all"]

_live: weakref.WeakSet[CallStats] = weakref.WeakSet()


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
        events: EventBus = EVENTS,
    ) -> None:
        self.dependency = dependency
        self.latency = latency if latency is not None else LatencyRecorder()  # empty is falsy
        self.fold_interval = fold_interval
        self.events = events
        self._now = now
        self._on_successes = tuple(on_successes)  # each gets the number of successes folded
        self._successes: deque[float] = deque()
        self._others: deque[float] = deque()
        self._lock = threading.Lock()
        self.fold_at = now() + fold_interval  # the hot path compares its clock with this
        self.success = self._successes.append  # hot path: a success's attempt duration
        self.other = self._others.append  # an attempt that did not succeed (still timed)
        _live.add(self)

    def fold(self) -> None:
        """Hand everything recorded so far to the window, the budget and the subscribers."""
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
            self.events.emit(AttemptDurations(self.dependency, (*ok, *other), len(ok)))
        if ok:
            for consumer in self._on_successes:
                consumer(len(ok))


def fold_all() -> None:
    """Fold every live CallStats (a scrape is about to read them)."""
    for stats in list(_live):
        stats.fold()
