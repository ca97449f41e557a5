"""Per-attempt timeout. Never infinite: a missing or non-positive timeout is a ConfigError.

The effective limit is ``min(timeout, remaining deadline)``, and the attempt runs under a
deadline scope of that size, so :func:`resilience.deadline.client_timeout` inside the call
gives clients a socket timeout that fits the attempt. Sync callables run in the bulkhead's
pool and are abandoned (not killed) on timeout; the bulkhead keeps counting them until they
return. Async callables run under ``asyncio.timeout`` and are cancelled.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from . import deadline as _deadline
from .bulkhead import Bulkhead
from .clock import SYSTEM_CLOCK, Clock
from .errors import AttemptTimeout, ConfigError, DeadlineExceeded

__all__ = ["Timeout", "check_timeout"]

T = TypeVar("T")


def check_timeout(seconds: float | None, what: str = "timeout") -> float:
    """Validate a timeout: finite and > 0."""
    if seconds is None or isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigError(f"{what} is required (never infinite), got {seconds!r}")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{what} must be a finite number of seconds > 0, got {seconds!r}")
    return float(seconds)


def _run_scoped(fn: Callable[..., T], attempt: _deadline.Deadline, *args: Any, **kwargs: Any) -> T:
    with _deadline.deadline_scope(attempt):
        return fn(*args, **kwargs)


class Timeout:
    def __init__(self, seconds: float, bulkhead: Bulkhead, clock: Clock = SYSTEM_CLOCK) -> None:
        self.seconds = check_timeout(seconds)
        self.bulkhead = bulkhead
        self.clock = clock

    def budget(self) -> float:
        """This attempt's limit: the timeout, or less if the deadline is nearer."""
        left = _deadline.remaining()
        if left is None:
            return self.seconds
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the attempt started")
        return min(self.seconds, left)

    def _expired(self, limit: float) -> AttemptTimeout:
        name = self.bulkhead.name
        return AttemptTimeout(f"{name}: attempt timed out after {limit * 1000:.0f} ms")

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        limit = self.budget()
        attempt = _deadline.Deadline(self.clock.now() + limit, self.clock)
        future = self.bulkhead.submit(_run_scoped, fn, attempt, *args, **kwargs)
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            if not future.cancel() and future.done():
                return future.result()  # finished in the race: keep the answer
            raise self._expired(limit) from None

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        limit = self.budget()
        attempt = _deadline.Deadline(self.clock.now() + limit, self.clock)
        cm: asyncio.Timeout | None = None
        await self.bulkhead.aacquire()
        try:
            with _deadline.deadline_scope(attempt):
                async with asyncio.timeout(limit) as cm:
                    return await fn(*args, **kwargs)
        except TimeoutError:
            if cm is not None and cm.expired():
                raise self._expired(limit) from None
            raise  # the callee's own TimeoutError
        finally:
            self.bulkhead.release()
