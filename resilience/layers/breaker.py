"""Breaker layer: a permit per attempt, and each attempt's outcome and duration recorded.

While the breaker is CLOSED with no merge due (:meth:`~resilience.breaker.CircuitBreaker.
closed_generation`), a permit is an attribute read and a fast success one count under a
lock; anything else asks the breaker for a permit. The layer also times every attempt into
the policy's :class:`~resilience.callstats.CallStats` (first-attempt successes as successes,
the rest as other attempts), which feeds latency, the duration histogram and the retry budget.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from ..breaker import CircuitBreaker, Permit
from ..callstats import CallStats
from ..chain import Call

__all__ = ["BreakerLayer"]


class BreakerLayer:
    def __init__(self, breaker: CircuitBreaker, stats: CallStats | None = None) -> None:
        self.breaker = breaker
        self.stats = stats if stats is not None else CallStats(breaker.name)
        self._now = breaker.clock.now
        slow = breaker.config.slow_call_duration
        self._slow_s = math.inf if slow is None else slow
        self._lock = breaker._lock  # count_success, inlined (it is one frame per call)
        self._success = self.stats.success
        self._other = self.stats.other

    def call(self, next: Callable[[Call], Any], c: Call) -> Any:
        start = self._now()
        if start >= self.stats.fold_at:
            self.stats.fold()
        b = self.breaker
        if start >= b._fast_until:  # not plainly CLOSED, or a merge is due: ask the breaker
            permit = self.breaker.acquire()
            try:
                result = next(c)
            except BaseException as exc:
                self._recorded(permit, start, c, exc)
                raise
            self._recorded(permit, start, c, None)
            return result
        generation = b._snap.generation  # closed_generation(start), inlined
        try:
            result = next(c)
        except BaseException as exc:
            took = self._now() - start
            b.record(Permit(False, generation, start), exc, took)
            self._other(took)
            raise
        took = self._now() - start
        if took < self._slow_s:
            with self._lock:  # count_success(generation), inlined
                if b._snap.generation == generation:
                    b._pending += 1
        else:
            b.record(Permit(False, generation, start), None, took)
        if c[6] == 1:  # c.attempt
            self._success(took)
        else:
            self._other(took)
        return result

    def _recorded(self, permit: Permit, start: float, c: Call, error: BaseException | None,
                  ) -> None:
        """Record and time an attempt that went through :meth:`CircuitBreaker.acquire`."""
        took = self._now() - start
        self.breaker.record(permit, error, took)
        if error is None and c.attempt == 1:
            self._success(took)
        else:
            self._other(took)

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any:
        start = self._now()
        if start >= self.stats.fold_at:
            self.stats.fold()
        permit = self.breaker.acquire()
        try:
            result = await next(c)
        except BaseException as exc:
            self._recorded(permit, start, c, exc)
            raise
        self._recorded(permit, start, c, None)
        return result
