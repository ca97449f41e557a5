"""Retry on tenacity: two scales of waiting, one count of attempts, an idempotency gate,
deadline-aware stopping and a retry budget.

The seed names two scales, and both are here:

* **in the call** (:class:`InCallPause`): a retry inside the call's deadline starts at once
  or after a short jittered pause, ``U(0, pause)`` (20 ms by default), shortened so the next
  attempt keeps its full per-attempt timeout; an attempt that would have less than half of
  it (the P99, when the timeout is P99 x 2) is not started. With 80 ms per attempt and
  200 ms in total: attempt 2 starts within 20 ms of attempt 1's timeout, attempt 3 never.
* **through the queue** (:func:`backoff_delay`, the seed's schedule; ``attempt`` is 1-based,
  the attempt about to start)::

    attempt 1: 0 (immediate)
    attempt n>1: 2^(n-1) * base + U(0, 2^(n-2) * base), capped at max_wait
    -> base 1 s: 2-3 s, 4-6 s, 8-12 s; tests use milliseconds.

  Workers use it for broker countdowns: no worker slot sleeps for seconds.

Attempts are counted across both: ``max_attempts`` is a job's total, and a worker passes
what is left of it for one delivery with :func:`attempts_allowed` (the count made comes back
in the :class:`Allowance`). Only transient errors retry (``TransientError`` and the
configured ``retry_on`` types); ``RejectedError`` (circuit open, bulkhead full, ...) and
``PermanentError`` surface at once. A retry never starts a sleep that would end past the
current deadline: it stops before.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity
from tenacity.wait import wait_base

from . import deadline as _deadline
from .clock import SYSTEM_CLOCK, Clock
from .errors import (
    ConfigError,
    DeadlineExceeded,
    NotIdempotent,
    PermanentError,
    RejectedError,
    RetriesExhausted,
    TransientError,
    exception_types,
)
from .events import EVENTS, EventBus, RetryScheduled
from .stores import MemoryStore, StateStore

__all__ = [
    "Allowance",
    "InCallPause",
    "Retrier",
    "RetryBudget",
    "RetryConfig",
    "SeedBackoff",
    "attempts_allowed",
    "backoff_delay",
    "is_retryable",
    "retry_call",
]

T = TypeVar("T")



@dataclass(frozen=True)
class RetryConfig:
    """Seed defaults: 4 attempts in all; in one call 2 of them with a pause of up to 20 ms
    ("one retry fits in the deadline"); through the queue base 1 s (2-3, 4-6, 8-12 s), no
    wait above 30 s."""

    max_attempts: int = 4
    base: float = 1.0  # queue scale
    max_wait: float = 30.0  # queue scale
    retry_on: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    pause: float = 0.02  # in-call scale: the longest jittered pause between attempts
    in_call_attempts: int = 2  # in-call scale: attempts in one call ("one retry fits")

    def __post_init__(self) -> None:
        if not (isinstance(self.max_attempts, int) and self.max_attempts >= 1):
            raise ConfigError(
                f"retry max_attempts must be an integer >= 1, got {self.max_attempts!r}"
            )
        if not (self.base > 0 and math.isfinite(self.base)):
            raise ConfigError(f"retry base must be > 0 s, got {self.base!r}")
        if not (self.max_wait > 0 and math.isfinite(self.max_wait)):
            raise ConfigError(
                f"retry max_wait must be > 0 s (never infinite), got {self.max_wait!r}"
            )
        if not (isinstance(self.pause, int | float) and self.pause >= 0
                and math.isfinite(self.pause)):
            raise ConfigError(f"retry pause must be >= 0 s and finite, got {self.pause!r}")
        if not (isinstance(self.in_call_attempts, int) and self.in_call_attempts >= 1):
            raise ConfigError(f"retry in_call_attempts must be an integer >= 1, got "
                              f"{self.in_call_attempts!r}")
        object.__setattr__(self, "retry_on", exception_types(self.retry_on, "retry_on"))

    @property
    def per_call(self) -> int:
        """Attempts one call may make: ``in_call_attempts``, within ``max_attempts``."""
        return min(self.max_attempts, self.in_call_attempts)


def backoff_delay(attempt: int, config: RetryConfig | None = None, rng: Any = random) -> float:
    """Seconds to wait before ``attempt`` (1-based); 0 for attempt 1.

    Workers use it for a Celery countdown: ``backoff_delay(self.request.retries + 2, cfg)``
    is the wait before the next attempt when ``retries`` retries already ran.
    """
    cfg = config or RetryConfig()
    if attempt < 1:
        raise ConfigError(f"attempt numbers start at 1, got {attempt}")
    if attempt == 1:
        return 0.0
    n = attempt - 1  # the n-th retry
    fixed = (2**n) * cfg.base
    jitter = rng.uniform(0.0, (2 ** (n - 1)) * cfg.base)
    return min(fixed + jitter, cfg.max_wait)


class SeedBackoff(wait_base):
    """The seed's schedule as a tenacity wait strategy."""

    def __init__(self, base: float = 1.0, max_wait: float = 30.0, rng: Any = random) -> None:
        self.config = RetryConfig(base=base, max_wait=max_wait)
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return backoff_delay(retry_state.attempt_number + 1, self.config, self.rng)


class InCallPause(wait_base):
    """The in-call scale: ``U(0, pause)``, shortened so the next attempt keeps its full
    ``attempt_timeout`` before the deadline (never below 0)."""

    def __init__(self, pause: float = 0.02, attempt_timeout: float | None = None,
                 rng: Any = random) -> None:
        self.pause, self.attempt_timeout, self.rng = pause, attempt_timeout, rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self.rng.uniform(0.0, self.pause) if self.pause > 0 else 0.0
        d = _deadline.current()
        if d is not None and self.attempt_timeout is not None:
            wait = max(0.0, min(wait, d.remaining() - self.attempt_timeout))
        return wait


@dataclass
class Allowance:
    """How many attempts one call may make (``limit``) and how many it made (``made``):
    a worker's share of a job's ``max_attempts`` for one delivery."""

    limit: int
    made: int = 0


_allowance: contextvars.ContextVar[Allowance | None] = contextvars.ContextVar(
    "tidegate_attempt_allowance", default=None)


@contextlib.contextmanager
def attempts_allowed(limit: int) -> Iterator[Allowance]:
    """Calls in this scope make at most ``limit`` attempts between them (at least one: the
    first is never refused here); the attempts made are counted in the yielded object."""
    allowance = Allowance(max(1, int(limit)))
    token = _allowance.set(allowance)
    try:
        yield allowance
    finally:
        _allowance.reset(token)


def current_allowance() -> Allowance | None:
    return _allowance.get()


def is_retryable(exc: BaseException, config: RetryConfig | None = None) -> bool:
    """Transient (or a configured type) and not a rejection or permanent error."""
    if isinstance(exc, RejectedError | PermanentError):
        return False
    retry_on = config.retry_on if config is not None else RetryConfig.retry_on
    return isinstance(exc, (TransientError, *retry_on))


class RetryBudget:
    """Retries allowed while ``retries + 1 <= ratio * requests + min_per_second * window``.

    As Finagle's and Envoy's budgets: 20% of traffic plus a floor, over a rolling window.
    Requests are counted locally and merged into the store every ``flush_interval``, so the
    success path pays no round trip; spending a retry is one atomic store call.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        *,
        name: str = "default",
        store: StateStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        flush_interval: float = 1.0,
    ) -> None:
        if not 0 <= ratio <= 1:
            raise ConfigError(f"retry budget ratio must be in [0, 1], got {ratio!r}")
        if min_per_second < 0:
            raise ConfigError(f"retry budget min_per_second must be >= 0, got {min_per_second!r}")
        if not window > 0:
            raise ConfigError(f"retry budget window must be > 0 s, got {window!r}")
        self.ratio, self.min_per_second, self.window = ratio, min_per_second, window
        self.name = name
        self.store: StateStore = store if store is not None else MemoryStore(clock)
        self.clock = clock
        self.flush_interval = 0.0 if isinstance(self.store, MemoryStore) else flush_interval
        self._pending = 0
        self._last_flush = -math.inf
        self._lock = threading.Lock()

    @property
    def floor(self) -> float:
        return self.min_per_second * self.window

    def _take_pending(self) -> int:
        with self._lock:
            n, self._pending = self._pending, 0
            self._last_flush = self.clock.now()
            return n

    def record_request(self, n: int = 1) -> None:
        """Count a first attempt (not a retry)."""
        if self.flush_interval == 0:  # memory store: deposit at once, no local batch
            self.store.budget_add(self.name, n, self.window)
            return
        with self._lock:
            self._pending += n
            due = self.clock.now() - self._last_flush >= self.flush_interval
        if due:
            self.store.budget_add(self.name, self._take_pending(), self.window)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False means: do not retry."""
        return self.store.budget_spend(
            self.name, self._take_pending(), self.ratio, self.floor, self.window
        )


def _no_room(sleep: float, attempt_timeout: float | None) -> bool:
    """True when, after ``sleep``, the deadline leaves no room for a useful attempt: none at
    all, or less than half the per-attempt timeout (its P99 when the timeout is P99 x 2)."""
    d = _deadline.current()
    if d is None:
        return False
    left = d.remaining() - sleep
    return left <= 0 or (attempt_timeout is not None and left < attempt_timeout / 2)


class _StopBeforeDeadline(tenacity.stop.stop_base):
    """Stop when the upcoming sleep would leave no room for the next attempt."""

    def __init__(self, attempt_timeout: float | None = None) -> None:
        self.attempt_timeout = attempt_timeout

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return _no_room(retry_state.upcoming_sleep, self.attempt_timeout)


class _StopOnAllowance(tenacity.stop.stop_base):
    """Stop when the job's share of attempts for this delivery is spent."""

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        a = _allowance.get()
        return a is not None and a.made >= a.limit


class _StopOnBudget(tenacity.stop.stop_base):
    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return not self.budget.try_spend()


class Retrier:
    """Runs an attempt function under the retry policy of one dependency.

    ``retryable=False`` (a non-idempotent call without key) runs exactly once and surfaces
    the error as is. When retries stop, the error is :class:`RetriesExhausted` (attempts or
    budget spent) or :class:`DeadlineExceeded` (no time left for the next wait), both chained
    to the last failure.

    ``wait`` defaults to the seed's schedule (:class:`SeedBackoff`, for work that can wait);
    a :class:`~resilience.policy.Policy` passes :class:`InCallPause`, its per-attempt
    timeout as ``attempt_timeout`` and ``attempts=config.per_call``, so its retries fit in
    the call's deadline. ``attempts`` defaults to ``max_attempts``.
    """

    def __init__(
        self,
        config: RetryConfig | None = None,
        *,
        name: str = "default",
        budget: RetryBudget | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: Any = random,
        events: EventBus = EVENTS,
        wait: wait_base | None = None,
        attempt_timeout: float | None = None,
        attempts: int | None = None,
    ) -> None:
        self.config = config or RetryConfig()
        self.attempts = attempts or self.config.max_attempts
        self.name = name
        self.events = events
        self.budget = budget
        self.clock = clock
        self.attempt_timeout = attempt_timeout
        self.wait = wait or SeedBackoff(self.config.base, self.config.max_wait, rng)
        stop = (tenacity.stop_after_attempt(self.attempts) | _StopOnAllowance()
                | _StopBeforeDeadline(attempt_timeout))
        if budget is not None:
            stop = stop | _StopOnBudget(budget)  # consulted last: spends only on a real retry
        self._kwargs = dict(
            stop=stop,
            wait=self.wait,
            retry=tenacity.retry_if_exception(lambda e: is_retryable(e, self.config)),
            before_sleep=self._before_sleep,
            retry_error_callback=self._give_up,
        )
        self._sync = tenacity.Retrying(sleep=clock.sleep, **self._kwargs)

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        self.events.emit(RetryScheduled(
            self.name, retry_state.attempt_number, retry_state.upcoming_sleep or 0.0,
            f"{type(error).__name__}: {error}"))

    def _give_up(self, retry_state: tenacity.RetryCallState) -> Any:
        last = retry_state.outcome.exception() if retry_state.outcome else None
        attempts = retry_state.attempt_number
        allowance = _allowance.get()
        if allowance is not None and allowance.made >= allowance.limit:
            raise RetriesExhausted(
                f"{self.name}: the job's attempts are spent ({attempts} in this call, "
                f"{allowance.made} of the {allowance.limit} this delivery may make); "
                f"last error: {type(last).__name__}: {last}",
                last_exception=last, attempts=attempts, dependency=self.name,
            ) from last
        if attempts < self.attempts:
            d = _deadline.current()
            if d is not None and _no_room(retry_state.upcoming_sleep, self.attempt_timeout):
                raise DeadlineExceeded(
                    f"{self.name}: deadline leaves no room for attempt {attempts + 1} "
                    f"(wait {retry_state.upcoming_sleep:.3f}s, {d.remaining():.3f}s left); "
                    f"last error: {type(last).__name__}: {last}"
                ) from last
            raise RetriesExhausted(
                f"{self.name}: retry budget exhausted after {attempts} attempt(s); "
                f"last error: {type(last).__name__}: {last}",
                last_exception=last,
                attempts=attempts,
                dependency=self.name,
            ) from last
        raise RetriesExhausted(
            last_exception=last, attempts=attempts, dependency=self.name
        ) from last

    # Attempt 1 is immediate in the seed's schedule, so it runs before tenacity is entered:
    # the success path never pays for tenacity's machinery. Once attempt 1 has failed,
    # tenacity takes over with that failure replayed as its own attempt 1, so stopping,
    # waiting, the budget and the final error are exactly tenacity's.

    def call(self, attempt: Callable[[], T], *, retryable: bool = True) -> T:
        if self.budget is not None:
            self.budget.record_request()
        if not retryable or self.attempts == 1:
            return attempt()
        try:
            return attempt()
        except Exception as exc:  # cancellation and interrupts surface as they are
            first = exc
        return self.resume(first, attempt)

    def resume(self, first: Exception, attempt: Callable[[], T]) -> T:
        """Go on after attempt 1 failed with ``first`` (run by the caller): attempts 2..n.

        The caller has counted the request (:meth:`RetryBudget.record_request`) and decided
        the call is retryable.
        """
        if self.attempts == 1:
            raise first
        return self._sync(_replay_first(first, attempt))

    async def acall(self, attempt: Callable[[], Awaitable[T]], *, retryable: bool = True) -> T:
        if self.budget is not None:
            self.budget.record_request()
        if not retryable or self.attempts == 1:
            return await attempt()
        try:
            return await attempt()
        except Exception as exc:  # cancellation and interrupts surface as they are
            first = exc
        return await self.aresume(first, attempt)

    async def aresume(self, first: Exception, attempt: Callable[[], Awaitable[T]]) -> T:
        """Async :meth:`resume`."""
        if self.attempts == 1:
            raise first
        # a fresh controller per call: tenacity keeps iteration state per thread, and many
        # coroutines share one thread
        return await tenacity.AsyncRetrying(sleep=self.clock.asleep, **self._kwargs)(
            _areplay_first(first, attempt)
        )


def _replay_first(first: BaseException, attempt: Callable[[], T]) -> Callable[[], T]:
    """An attempt function whose first run re-raises ``first`` (attempt 1, already run)."""
    pending = [first]

    def replay() -> T:
        if pending:
            raise pending.pop()
        return attempt()

    return replay


def _areplay_first(
    first: BaseException, attempt: Callable[[], Awaitable[T]]
) -> Callable[[], Awaitable[T]]:
    pending = [first]

    async def replay() -> T:
        if pending:
            raise pending.pop()
        return await attempt()

    return replay


def retry_call(
    fn: Callable[[], T],
    config: RetryConfig | None = None,
    *,
    idempotent: bool,
    idempotency_key: str | None = None,
    **retrier_kwargs: Any,
) -> T:
    """Retry ``fn`` on its own. Asking to retry a non-idempotent call without a key is refused
    with :class:`NotIdempotent` (a programming error), before ``fn`` runs."""
    cfg = config or RetryConfig()
    if not idempotent and idempotency_key is None and cfg.max_attempts > 1:
        raise NotIdempotent(
            "refusing to retry a non-idempotent call without an idempotency key "
            "(pass idempotency_key=..., or max_attempts=1)"
        )
    return Retrier(cfg, **retrier_kwargs).call(fn)
