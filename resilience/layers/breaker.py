"""Breaker layer: a permit per attempt, and each attempt's outcome and duration recorded.

While the breaker is CLOSED with no merge due (:meth:`~resilience.breaker.CircuitBreaker.
closed_generation`), a permit is an attribute read and a fast success one ``next()`` of the
generation's tally (:meth:`~resilience.breaker.CircuitBreaker.count_success`, inlined);
anything else asks the breaker for a permit. The layer also times every attempt into the
policy's :class:`~resilience.callstats.CallStats` (first-attempt successes as successes, the
rest as other attempts), which feeds latency, the duration histogram and the retry budget.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Awaitable, Callable
from typing import Any

from ..breaker import CircuitBreaker, Permit
from ..callstats import CallStats
from ..chain import Compiled

__all__ = ["BreakerLayer"]


class BreakerLayer(Compiled):
    def __init__(self, breaker: CircuitBreaker, stats: CallStats | None = None) -> None:
        self.breaker = breaker
        self.stats = stats if stats is not None else CallStats(breaker.name)

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        b, stats, recorded = self.breaker, self.stats, self._recorded
        now, fold, success, other = b.clock.now, stats.fold, stats.success, stats.other
        slow = b.config.slow_call_duration
        slow_s = math.inf if slow is None else slow
        tick = builtins.next

        def breaker(c: tuple) -> Any:
            start = now()
            if start >= stats.fold_at:
                fold()
            if start >= b._fast_until:  # not plainly CLOSED, or a merge is due: ask
                permit = b.acquire()
                try:
                    result = next(c)
                except BaseException as exc:
                    recorded(permit, start, c, exc)
                    raise
                recorded(permit, start, c, None)
                return result
            generation, tally = b._fast  # closed_generation(start), inlined
            try:
                result = next(c)
            except BaseException as exc:
                took = now() - start
                b.record(Permit(False, generation, start), exc, took)
                other(took)
                raise
            took = now() - start
            if took < slow_s:
                tick(tally)  # count_success(generation), inlined
            else:
                b.record(Permit(False, generation, start), None, took)
            if c[6] == 1:  # c.attempt
                success(took)
            else:
                other(took)
            return result

        return breaker

    def _recorded(self, permit: Permit, start: float, c: tuple, error: BaseException | None,
                  ) -> None:
        """Record and time an attempt that went through :meth:`CircuitBreaker.acquire`."""
        took = self.breaker.clock.now() - start
        self.breaker.record(permit, error, took)
        if error is None and c[6] == 1:
            self.stats.success(took)
        else:
            self.stats.other(took)

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        start = self.breaker.clock.now()
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
