"""Retry layer: attempt 1 runs inline; once it fails, tenacity runs attempts 2..n.

A call is retried only if its dependency is idempotent or it carries an idempotency key. One
that may not be retried and answered late keeps its answer (its effect happened; reporting a
failure would hide it) - the breaker below has counted the timeout all the same.

Every attempt is counted in the caller's :class:`~resilience.retry.Allowance` when there is
one (a worker's share of a job's attempts for one delivery), so in-call retries and broker
retries add up to the job's ``max_attempts``.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .. import deadline as _deadline
from ..callstats import CallStats
from ..chain import Compiled
from ..errors import LateResult, RejectedError
from ..events import EVENTS, CallFinished, EventBus
from ..retry import Retrier, _allowance, current_allowance

__all__ = ["RetryLayer"]

log = logging.getLogger(__name__)

_get, _set, _reset = _deadline._current.get, _deadline._current.set, _deadline._current.reset
_allowance_get = _allowance.get  # current_allowance(), one frame fewer on the hot path


class RetryLayer(Compiled):
    def __init__(
        self,
        retrier: Retrier,
        *,
        idempotent: bool,
        stats: CallStats | None = None,
        events: EventBus = EVENTS,
    ) -> None:
        self.retrier = retrier
        self.idempotent = idempotent
        self.stats = stats
        self.events = events

    def _first_failed(self, c: tuple, first: Exception) -> bool:
        """Count the request; True if the call may be retried."""
        if self.stats is not None:
            self.stats.fold()  # the budget sees every earlier success before a retry is decided
        if self.retrier.budget is not None:
            self.retrier.budget.record_request()
        return self.idempotent or c[3] is not None  # c.key

    def _kept(self, late: LateResult) -> Any:
        log.warning("%s: answered after the attempt timeout; the result is kept (the call may "
                    "not be retried, its effect happened)", self.retrier.name)
        self.events.emit(CallFinished(self.retrier.name, "success"))
        return late.result

    @staticmethod
    def _attempts(next: Callable[[tuple], Any], c: tuple) -> Callable[[], Any]:
        """Attempts 2, 3, ... of ``c``, one per call (each counted in the allowance)."""
        numbers = iter(range(2, 1 << 30))
        allowance = current_allowance()

        def attempt() -> Any:
            if allowance is not None:
                allowance.made += 1
            n = builtins.next(numbers)
            try:
                return next((*c[:6], n, c[7]))  # c._replace(attempt=n)
            except RejectedError as exc:  # refused now, but earlier attempts went out
                exc.after_attempts = n - 1  # type: ignore[attr-defined]
                raise

        return attempt

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        after_first = self._after_first

        def retry(c: tuple) -> Any:
            allowance = _allowance_get()
            if allowance is not None:
                allowance.made += 1
            try:
                return next(c)
            except Exception as exc:  # cancellation and interrupts surface as they are
                first = exc
            return after_first(next, c, first)

        return retry

    def _after_first(self, next: Callable[[tuple], Any], c: tuple, first: Exception) -> Any:
        """Attempt 1 failed: give up, keep a late answer, or let tenacity run the rest."""
        if not self._first_failed(c, first):
            if isinstance(first, LateResult):
                return self._kept(first)
            raise first
        d = c[7]  # the call's deadline, published while tenacity waits: it stops before it
        token = _set(d) if d is not None and d is not _get() else None
        try:
            result = self.retrier.resume(first, self._attempts(next, c))
        finally:
            if token is not None:
                _reset(token)
        self.events.emit(CallFinished(self.retrier.name, "success"))
        return result

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        allowance = current_allowance()
        if allowance is not None:
            allowance.made += 1
        try:
            return await next(c)
        except Exception as exc:
            first = exc
        if not self._first_failed(c, first):
            raise first

        result = await self.retrier.aresume(first, self._attempts(next, c))
        self.events.emit(CallFinished(self.retrier.name, "success"))
        return result
