"""Adaptive concurrency limit: a bulkhead that finds its own size from latency and failures.

A hand-picked bulkhead size is wrong as soon as the dependency gets faster, slower or smaller.
:class:`AdaptiveLimiter` moves the in-flight limit instead, with a *gradient* rule (Netflix
concurrency-limits' Gradient2, failsafe-go's adaptivelimiter) against a *windowed-minimum*
baseline (BBR's min-RTT filter)::

    short    = EWMA of attempt latencies (the last ~short_window samples)
    baseline = the lowest ``short`` seen over the last ``baseline_window`` seconds
    gradient = clamp(tolerance * baseline / short, 0.5, 1.0)
    limit    = limit * (1 - smoothing) + (limit * gradient + log10(limit)) * smoothing

So while latency stays within ``tolerance`` of the baseline the limit grows by a small queue
allowance (``log10(limit)``, as TCP Vegas sizes its queue) and, once latency rises, it falls
in proportion - never below ``min`` nor above ``max``. A failed attempt (a timeout, a 5xx, a
connection error) cuts it by ``backoff``, once per round trip (the failures of one overload
episode are one signal, as TCP cuts its window once per loss event); a refused or
permanently rejected one says nothing
about load and is not sampled. The limit only grows while at least half of it is in use (an
idle limit proves nothing). Why a gradient rather than Vegas's difference of queues, and why
this baseline: docs/resilience.md.

When the limit is reached a caller waits up to ``max_wait`` in a priority queue: a freed
slot goes to the most important waiter (CRITICAL first, FIFO within a class); when
``max_waiters`` are already waiting a newcomer evicts the least important one if it is
itself more important (so LOW is shed first), else it is refused. Each refusal is a
:class:`~resilience.errors.ConcurrencyLimited`.

Every process adapts alone (docs/resilience.md says why): the state is this object's.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from .clock import SYSTEM_CLOCK, Clock
from .errors import ConcurrencyLimited, ConfigError, PermanentError, RejectedError
from .events import EVENTS, ConcurrencyLimit, EventBus, Rejected
from .shedding import Priority

__all__ = ["FAILURE", "IGNORE", "SUCCESS", "AdaptiveLimitConfig", "AdaptiveLimiter", "outcome"]

SUCCESS, FAILURE, IGNORE = "success", "failure", "ignore"


def outcome(error: BaseException | None) -> str:
    """How an attempt's end counts: a success is a latency sample, a transient failure is a
    load signal, a refusal or a permanent error (the request's fault) is neither."""
    if error is None:
        return SUCCESS
    if isinstance(error, RejectedError | PermanentError) or not isinstance(error, Exception):
        return IGNORE
    return FAILURE


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"adaptive limit {what} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class AdaptiveLimitConfig:
    """``min <= initial <= max`` in-flight calls; ``max_wait`` seconds in the priority queue.

    The rule's constants (the file sets only min, max, initial and max_wait): ``tolerance``
    how far latency may rise over the baseline before the limit falls; ``smoothing`` how much
    of each step is taken; ``short_window`` samples in the latency average;
    ``baseline_window`` seconds the baseline remembers its minimum (a dependency that became
    slower for good is the new normal after that long); ``backoff`` the cut per failure
    (at most one per round trip, the latency average);
    ``max_waiters`` the queue's length (None: ``max``); ``report_every`` seconds between
    :class:`~resilience.events.ConcurrencyLimit` events while the limit holds still.
    """

    min: int = 1
    max: int = 200
    initial: int = 20
    max_wait: float = 0.0
    tolerance: float = 1.25
    smoothing: float = 0.2
    short_window: int = 20
    baseline_window: float = 30.0
    backoff: float = 0.9
    max_waiters: int | None = None
    report_every: float = 1.0

    def __post_init__(self) -> None:
        _int(self.min, "min")
        _int(self.max, "max")
        _int(self.initial, "initial")
        _int(self.short_window, "short_window")
        if not self.min <= self.initial <= self.max:
            raise ConfigError(f"adaptive limit needs min <= initial <= max, got min={self.min}, "
                              f"initial={self.initial}, max={self.max}")
        if not (self.max_wait >= 0 and math.isfinite(self.max_wait)):
            raise ConfigError(f"adaptive limit max_wait must be >= 0 s and finite, "
                              f"got {self.max_wait!r}")
        if not self.tolerance >= 1:
            raise ConfigError(f"adaptive limit tolerance must be >= 1, got {self.tolerance!r}")
        if not 0 < self.smoothing <= 1:
            raise ConfigError(f"adaptive limit smoothing must be in (0, 1], got {self.smoothing!r}")
        if not 0 < self.backoff < 1:
            raise ConfigError(f"adaptive limit backoff must be in (0, 1), got {self.backoff!r}")
        if not self.baseline_window > 0:
            raise ConfigError(f"adaptive limit baseline_window must be > 0 s, "
                              f"got {self.baseline_window!r}")
        if self.max_waiters is not None:
            _int(self.max_waiters, "max_waiters")


class _Waiter:
    """One caller queued for a slot; ``wake`` tells it the outcome (granted or dropped)."""

    __slots__ = ("done", "granted", "wake")

    def __init__(self, wake: Any) -> None:
        self.granted = False
        self.done = False  # granted, dropped or gone: skipped when popped
        self.wake = wake


class _WindowedMin:
    """The minimum of values seen over the last ``window`` seconds, in 8 buckets."""

    def __init__(self, window: float) -> None:
        self.bucket = window / 8
        self.buckets: deque[tuple[float, float]] = deque()  # (bucket start, min)

    def add(self, now: float, value: float) -> None:
        b = self.buckets
        while b and b[0][0] <= now - 8 * self.bucket:
            b.popleft()
        if b and now - b[-1][0] < self.bucket:
            if value < b[-1][1]:
                b[-1] = (b[-1][0], value)
        else:
            b.append((now, value))

    def value(self) -> float:
        return min(v for _, v in self.buckets)


class AdaptiveLimiter:
    """The limit, the in-flight count and the waiters of one dependency in this process."""

    def __init__(self, name: str, config: AdaptiveLimitConfig | None = None, *,
                 clock: Clock = SYSTEM_CLOCK, events: EventBus = EVENTS) -> None:
        self.name = name
        self.config = c = config or AdaptiveLimitConfig()
        self.clock = clock
        self.events = events
        self._limit = float(c.initial)
        self._in_flight = 0
        self._short: float | None = None
        self._baseline = _WindowedMin(c.baseline_window)
        self._alpha = 2 / (c.short_window + 1)
        self._max_waiters = c.max_waiters or c.max
        self._heap: list[tuple[int, int, _Waiter]] = []
        self._waiting = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._reported: tuple[int, float] = (0, -math.inf)  # (limit, when)
        self._cut_until = -math.inf  # failures before then belong to the last cut's episode

    # -- what the metrics show
    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def baseline(self) -> float | None:
        """The latency baseline (seconds), None before the first sample."""
        with self._lock:
            return self._baseline.value() if self._baseline.buckets else None

    # -- admission
    def _try_take(self) -> bool:  # under the lock
        if self._in_flight < int(self._limit) and not self._waiting:
            self._in_flight += 1
            return True
        return False

    def _enqueue(self, priority: Priority, waiter: _Waiter) -> bool:
        """Queue ``waiter`` (under the lock); False when it is refused (queue full of equal or
        more important callers). A less important waiter it displaces is dropped."""
        if self._waiting >= self._max_waiters:
            live = [e for e in self._heap if not e[2].done]
            worst = max(live, key=lambda e: (e[0], e[1]))
            if worst[0] <= priority:
                return False
            self._drop(worst[2])
        self._seq += 1
        heapq.heappush(self._heap, (int(priority), self._seq, waiter))
        self._waiting += 1
        return True

    def _drop(self, waiter: _Waiter) -> None:
        waiter.done = True
        self._waiting -= 1
        waiter.wake()

    def _admit(self) -> None:
        """Hand free slots to the most important waiters (under the lock)."""
        while self._waiting and self._in_flight < int(self._limit):
            _, _, waiter = heapq.heappop(self._heap)
            if waiter.done:
                continue
            waiter.done = waiter.granted = True
            self._waiting -= 1
            self._in_flight += 1
            waiter.wake()
        if not self._waiting:
            self._heap.clear()  # only dropped entries left

    def _reject(self, priority: Priority) -> None:
        self.events.emit(Rejected(self.name, ConcurrencyLimited.reason))
        raise ConcurrencyLimited(
            f"{self.name}: concurrency limit {self.limit} reached (priority {priority.name})",
            dependency=self.name)

    def _gone(self, waiter: _Waiter) -> bool:
        """The wait ran out: True if the slot came anyway (keep it), else leave the queue."""
        with self._lock:
            if waiter.granted:
                return True
            if not waiter.done:
                waiter.done = True
                self._waiting -= 1
            return False

    def acquire(self, priority: Priority = Priority.HIGH, max_wait: float | None = None) -> None:
        """Take an in-flight slot, waiting at most ``max_wait`` (default: the config's) in
        priority order, or raise ConcurrencyLimited."""
        wait = self.config.max_wait if max_wait is None else max_wait
        with self._lock:
            if self._try_take():
                return
            if wait <= 0:
                waiter = None
            else:
                event = threading.Event()
                waiter = _Waiter(event.set)
                if not self._enqueue(priority, waiter):
                    waiter = None
        if waiter is None:
            self._reject(priority)
            return
        event.wait(wait)
        if not self._gone(waiter):
            self._reject(priority)

    async def aacquire(self, priority: Priority = Priority.HIGH,
                       max_wait: float | None = None) -> None:
        """:meth:`acquire` for asyncio: the waiter is a future woken from any thread."""
        wait = self.config.max_wait if max_wait is None else max_wait
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

        with self._lock:
            if self._try_take():
                return
            waiter = _Waiter(wake) if wait > 0 else None
            if waiter is not None and not self._enqueue(priority, waiter):
                waiter = None
        if waiter is None:
            self._reject(priority)
            return
        try:
            await asyncio.wait_for(asyncio.shield(future), wait)
        except TimeoutError:
            pass
        except BaseException:  # cancelled: give back a slot that came meanwhile
            if self._gone(waiter):
                self.release(0.0, IGNORE)
            raise
        if not self._gone(waiter):
            self._reject(priority)

    # -- adaptation
    def release(self, took: float, result: str = SUCCESS) -> None:
        """Give the slot back after an attempt of ``took`` seconds that ended in ``result``
        (:data:`SUCCESS`, :data:`FAILURE` or :data:`IGNORE`) and adapt the limit."""
        c = self.config
        now = self.clock.now()
        with self._lock:
            busy = self._in_flight
            self._in_flight -= 1
            if result == SUCCESS:
                short = took if self._short is None else self._short + self._alpha * (
                    took - self._short)
                self._short = short
                self._baseline.add(now, short)
                baseline = self._baseline.value()
                limit = self._limit
                gradient = 1.0 if short <= 0 else max(0.5, min(1.0, c.tolerance * baseline / short))
                target = limit * gradient + math.log10(max(limit, 10))
                if target < limit or 2 * busy >= limit:  # grow only a limit in use
                    limit += (target - limit) * c.smoothing
                    self._limit = max(c.min, min(c.max, limit))
            elif result == FAILURE and now >= self._cut_until:
                # one cut per round trip: the failures of one overload episode are one
                # signal (TCP cuts its window once per loss event, not per lost packet)
                self._limit = max(c.min, self._limit * c.backoff)
                self._cut_until = now + (self._short if self._short is not None else took)
            self._admit()
            report = self._report_due(now)
        if report is not None:
            self.events.emit(report)

    def _report_due(self, now: float) -> ConcurrencyLimit | None:
        """The event to emit (under the lock): when the limit moved, or ``report_every``."""
        limit = int(self._limit)
        last, when = self._reported
        if limit == last and now - when < self.config.report_every:
            return None
        self._reported = (limit, now)
        return ConcurrencyLimit(self.name, limit, self._in_flight,
                                self._baseline.value() if self._baseline.buckets else 0.0)

    def __repr__(self) -> str:
        return (f"AdaptiveLimiter({self.name!r}, limit={self.limit}, "
                f"in_flight={self._in_flight}, waiting={self._waiting})")
