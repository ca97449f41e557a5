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
from collections.abc import Awaitable, Callable, Mapping
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

_get, _set, _reset = _deadline._current.get, _deadline._current.set, _deadline._current.reset
_tuple_new = tuple.__new__

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


def _apply(call: tuple) -> T:
    return call[0](*call[1], **call[2])


def _standalone(fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """A standalone attempt shaped like the chain's ``Call`` for :meth:`Timeout.run_inline`:
    function, arguments, and no deadline bound at index 7."""
    return (fn, args, kwargs, None, None, None, None, None)


def _run_scoped(fn: Callable[..., T], attempt: _deadline.Deadline, *args: Any, **kwargs: Any) -> T:
    with _deadline.deadline_scope(attempt):
        return fn(*args, **kwargs)


class Timeout:
    """One dependency's per-attempt limit. ``mode`` picks how sync attempts are bounded.

    ``bulkhead`` is optional. Given, :meth:`call` and :meth:`acall` run under one of its slots,
    and the abandon mode runs attempts in its pool, so abandoned work stays bounded by its
    limit; without one, the abandon mode uses a private pool of ``BulkheadConfig()``'s size.
    In a chain, the bulkhead is a layer of its own and the timeout layer calls
    :meth:`inline` / :meth:`bounded` (no slot), except in the abandon mode (its pool holds the
    slot until the work really ends).
    """

    def __init__(
        self,
        seconds: float,
        bulkhead: Bulkhead | None = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        mode: str = ABANDON,
        name: str | None = None,
    ) -> None:
        self.seconds = check_timeout(seconds)
        self.bulkhead = bulkhead
        self.clock = clock
        self.mode = check_timeout_mode(mode)
        self.name = name or (bulkhead.name if bulkhead is not None else "call")
        # abandoned work needs a bounded pool: the bulkhead's, or a private one (lazy threads)
        self._pool = bulkhead if bulkhead is not None else Bulkhead(f"{self.name}-timeout")

    def budget(self, bound: _deadline.Deadline | None = None) -> float:
        """This attempt's limit: the timeout, or less if the deadline (or ``bound``, a call's
        deadline not published yet) is nearer."""
        d = _get()  # an (expires_at, clock) pair, a Deadline or not
        if bound is not None and (d is None or bound[0] < d[0]):
            d = bound
        if d is None:
            return self.seconds
        left = d[0] - d[1].now()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the attempt started")
        return min(self.seconds, left)

    def _expired(self, limit: float) -> AttemptTimeout:
        return AttemptTimeout(f"{self.name}: attempt timed out after {limit * 1000:.0f} ms")

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one sync attempt within the limit (in this timeout's mode)."""
        if self.mode == ABANDON:
            return self.run_abandon(None, fn, args, kwargs)
        if self.bulkhead is None:
            return self.run_inline(_apply, _standalone(fn, args, kwargs))
        self.bulkhead.acquire()
        try:
            return self.run_inline(_apply, _standalone(fn, args, kwargs))
        finally:
            self.bulkhead.release()

    def abandon(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the pool and give up waiting after the limit (it runs on)."""
        return self.run_abandon(None, fn, args, kwargs)

    def inline(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` here under the attempt's budget; a late answer is a timeout."""
        return self.run_inline(_apply, _standalone(fn, args, kwargs))

    def run_abandon(self, bound: _deadline.Deadline | None, fn: Callable[..., T],
                    args: tuple, kwargs: Mapping[str, Any]) -> T:
        """:meth:`abandon`, also bounded by ``bound`` (a deadline not published yet)."""
        limit = self.budget(bound)
        attempt = _deadline.Deadline(self.clock.now() + limit, self.clock)
        future = self._pool.submit(_run_scoped, fn, attempt, *args, **kwargs)
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            if not future.cancel() and future.done():
                return future.result()  # finished in the race: keep the answer
            raise self._expired(limit) from None

    def run_inline(self, fn: Callable[[Any], T], c: tuple) -> T:
        """:meth:`inline` of ``fn(c)``, ``c`` shaped like the chain's call (its deadline at
        index 7): :meth:`around` built for one attempt."""
        return self.around(fn)(c)

    def around(self, next: Callable[[tuple], T]) -> Callable[[tuple], T]:
        """The cooperative attempt around ``next``, the chain's ``next(c)`` (the timeout
        layer's closure): also bounded by ``c[7]``, the call's deadline (an ``(expires_at,
        clock)`` pair not published yet; None when there is none).

        The attempt's scope is published once: the attempt's own expiry, or the nearer
        deadline when that is tighter (not published again if it already is). The timeout
        is read per attempt (``timeout_ms = "p99x2"`` moves it).
        """
        timeout, clock, now, expired = self, self.clock, self.clock.now, self._expired

        def attempt(c: tuple) -> T:
            start = now()
            current = outer = _get()
            bound = c[7]
            if bound is not None and (outer is None or bound[0] < outer[0]):
                outer = bound
            limit = timeout.seconds
            if outer is None:  # the scope is published as a plain pair (see deadline._current)
                expires = start + limit
                scope = (expires, clock)
            else:
                expires = outer[0]
                left = expires - start
                if left <= 0:
                    raise DeadlineExceeded("deadline exceeded before the attempt started")
                if left > limit:
                    expires = start + limit
                    scope = (expires, clock)
                else:  # the deadline is the tighter bound: reuse it
                    limit = left
                    scope = outer
            token = None if scope is current else _set(scope)
            try:
                result = next(c)
            except Exception as exc:
                if now() >= expires:
                    raise expired(limit) from exc  # a late error is a timeout too
                raise
            finally:
                if token is not None:
                    _reset(token)
            if now() >= expires:  # a late result is a timeout (the Policy may keep it)
                raise LateResult(str(expired(limit)), result)
            return result

        return attempt

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await one attempt within the limit (under a bulkhead slot if there is a bulkhead)."""
        if self.bulkhead is None:
            return await self.bounded(fn, *args, **kwargs)
        await self.bulkhead.aacquire()
        try:
            return await self.bounded(fn, *args, **kwargs)
        finally:
            self.bulkhead.release()

    async def bounded(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await ``fn`` under ``asyncio.timeout``: cancelled at the limit, in either mode."""
        limit = self.budget()
        attempt = _deadline.Deadline(self.clock.now() + limit, self.clock)
        cm: asyncio.Timeout | None = None
        try:
            with _deadline.deadline_scope(attempt):
                async with asyncio.timeout(limit) as cm:
                    return await fn(*args, **kwargs)
        except TimeoutError:
            if cm is not None and cm.expired():
                raise self._expired(limit) from None
            raise  # the callee's own TimeoutError
