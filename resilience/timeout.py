"""Per-attempt timeout. Never infinite: a missing or non-positive timeout is a ConfigError.

The effective limit is ``min(timeout, remaining deadline)``, and the attempt runs under a
deadline scope of that size, so :func:`resilience.deadline.client_timeout` inside the call
gives clients a socket timeout that fits the attempt.

Sync callables run in one of two modes, chosen per dependency (``timeout.mode`` in the policy
table, :attr:`resilience.policy.PolicyConfig.timeout_mode`):

``"cooperative"`` (the policy default)
    The attempt runs inline in the caller's thread under a bulkhead slot. The limit is
    enforced by the callee: every client it opens takes its timeout from
    :func:`~resilience.deadline.client_timeout` (Tidegate's HTTP client does), so its sockets
    give up when the attempt's budget is spent. Whatever comes back after the limit - a
    result or an error - is an :class:`~resilience.errors.AttemptTimeout`, exactly as in the
    abandon mode: the breaker counts it as a failure, the retry layer sees a timeout, the
    caller never gets a late success. No thread hop, so the success path costs a few
    microseconds instead of two thread wake-ups, thread-local state (a Celery task's request)
    stays visible to the callee, and Celery's soft time limit can still interrupt it. What it
    cannot do: return control before a callee that ignores its budget returns.

``"abandon"`` (the :class:`Timeout` default)
    The attempt runs in the bulkhead's pool and is abandoned (not killed) on timeout; the
    bulkhead keeps counting it until it returns, so abandoned work stays bounded. The caller
    gets control back on time even from a callee that ignores its budget; the price is two
    thread hand-offs per attempt and a callee that runs outside the caller's thread.

Async callables run under ``asyncio.timeout`` and are cancelled, in either mode.
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
from .errors import AttemptTimeout, ConfigError, DeadlineExceeded, LateResult

__all__ = [
    "ABANDON",
    "COOPERATIVE",
    "DEFAULT_TIMEOUT_MODE",
    "TIMEOUT_MODES",
    "Timeout",
    "check_timeout",
    "check_timeout_mode",
]

T = TypeVar("T")

COOPERATIVE = "cooperative"
ABANDON = "abandon"
TIMEOUT_MODES = (COOPERATIVE, ABANDON)
DEFAULT_TIMEOUT_MODE = COOPERATIVE
"""The mode a policy gets when its table says nothing (see the module docstring)."""


def check_timeout(seconds: float | None, what: str = "timeout") -> float:
    """Validate a timeout: finite and > 0."""
    if seconds is None or isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigError(f"{what} is required (never infinite), got {seconds!r}")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{what} must be a finite number of seconds > 0, got {seconds!r}")
    return float(seconds)


def check_timeout_mode(mode: str, what: str = "timeout mode") -> str:
    """Validate a timeout mode: ``"cooperative"`` or ``"abandon"``."""
    if mode not in TIMEOUT_MODES:
        raise ConfigError(f"{what} must be one of {', '.join(TIMEOUT_MODES)}, got {mode!r}")
    return mode


def _run_scoped(fn: Callable[..., T], attempt: _deadline.Deadline, *args: Any, **kwargs: Any) -> T:
    with _deadline.deadline_scope(attempt):
        return fn(*args, **kwargs)


class Timeout:
    """One dependency's per-attempt limit. ``mode`` picks how sync attempts are bounded."""

    def __init__(
        self,
        seconds: float,
        bulkhead: Bulkhead,
        clock: Clock = SYSTEM_CLOCK,
        *,
        mode: str = ABANDON,
    ) -> None:
        self.seconds = check_timeout(seconds)
        self.bulkhead = bulkhead
        self.clock = clock
        self.mode = check_timeout_mode(mode)
        self.call = self._call_inline if mode == COOPERATIVE else self._call_pool

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
        """Run one sync attempt within the limit (in this timeout's mode)."""
        return self.call(fn, *args, **kwargs)  # replaced per instance in __init__

    def _call_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        limit = self.budget()
        attempt = _deadline.Deadline(self.clock.now() + limit, self.clock)
        future = self.bulkhead.submit(_run_scoped, fn, attempt, *args, **kwargs)
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            if not future.cancel() and future.done():
                return future.result()  # finished in the race: keep the answer
            raise self._expired(limit) from None

    def _call_inline(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        clock = self.clock
        now = clock.now()
        outer = _deadline._current.get()
        if outer is None:
            limit = self.seconds
            expires = now + limit
            scope = _deadline.Deadline(expires, clock)
        else:
            expires = outer.expires_at
            limit = expires - now
            if limit <= 0:
                raise DeadlineExceeded("deadline exceeded before the attempt started")
            if limit > self.seconds:
                limit = self.seconds
                expires = now + limit
                scope = _deadline.Deadline(expires, clock)
            else:
                scope = outer  # the deadline is the tighter bound: reuse it
        bulkhead = self.bulkhead
        bulkhead.acquire()
        token = _deadline._current.set(scope)
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if clock.now() >= expires:
                raise self._expired(limit) from exc  # a late error is a timeout too
            raise
        finally:
            _deadline._current.reset(token)
            bulkhead.release()
        if clock.now() >= expires:  # a late result is a timeout (the Policy may keep it)
            raise LateResult(str(self._expired(limit)), result)
        return result

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
