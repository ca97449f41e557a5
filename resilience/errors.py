"""One exception tree for every pattern in the chain.

Callers branch on three questions: is it worth retrying later (``TransientError``), will it
never succeed (``PermanentError``), or did we refuse to even try (``RejectedError``, which
carries ``retry_after`` so HTTP layers can answer 429/503 with ``Retry-After``)?
Every ``str()`` is one line so logs and dead-letter records stay greppable.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AttemptTimeout",
    "Backpressure",
    "BulkheadFull",
    "CircuitOpen",
    "ConcurrencyLimited",
    "ConfigError",
    "DeadlineExceeded",
    "DeferralError",
    "InProgress",
    "LateResult",
    "NotIdempotent",
    "PermanentError",
    "RateLimited",
    "RejectedError",
    "RetriesExhausted",
    "Shed",
    "TidegateError",
    "TransientError",
    "did_you_mean",
    "exception_types",
]


def exception_types(value: object, what: str) -> tuple[type[BaseException], ...]:
    """Normalise a config value to a tuple of exception classes; ConfigError names ``what``."""
    items = (value,) if isinstance(value, type) else tuple(value)  # type: ignore[arg-type]
    for v in items:
        if not (isinstance(v, type) and issubclass(v, BaseException)):
            raise ConfigError(f"{what} must hold exception types, got {v!r}")
    return items


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for a close known name, else ``"; known: a, b"`` (or "")."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known: {', '.join(known)}" if known else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class TidegateError(Exception):
    """Root of every error Tidegate raises on purpose."""

    def __str__(self) -> str:
        return _one_line(super().__str__())


class ConfigError(TidegateError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class TransientError(TidegateError):
    """The call may succeed later: worth retrying (with backoff, if idempotent)."""


class PermanentError(TidegateError):
    """The call will never succeed as made: never retried, dead-lettered at once."""


class RejectedError(TransientError):
    """Refused before calling the dependency (fail fast); never retried inside a chain.

    ``retry_after`` (seconds) tells the caller when trying again makes sense, if known.
    """

    reason = "rejected"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: float | None = None,
        dependency: str | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.dependency = dependency
        if message is None:
            message = self.reason.replace("_", " ")
            if dependency:
                message = f"{dependency}: {message}"
        if retry_after is not None:
            message = f"{message} (retry after {retry_after:.3f}s)"
        super().__init__(message)

    def __reduce__(self):  # keep attributes across pickling (Celery, multiprocessing)
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    obj = cls.__new__(cls)
    Exception.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class CircuitOpen(RejectedError):
    """The dependency's circuit breaker is OPEN (or HALF_OPEN with all trial slots taken)."""

    reason = "circuit_open"


class BulkheadFull(RejectedError):
    """All of the dependency's concurrency slots are busy and the wait ran out."""

    reason = "bulkhead_full"


class ConcurrencyLimited(BulkheadFull):
    """The dependency's adaptive concurrency limit is reached and the wait ran out (or a
    more important caller took this one's place in the queue)."""

    reason = "concurrency_limit"


class RateLimited(RejectedError):
    """The caller (key) exceeded its rate: HTTP 429 with Retry-After."""

    reason = "rate_limited"


class InProgress(RejectedError):
    """The dependency refused the request because an earlier one with the same idempotency key
    is still in progress (HTTP 409): this one applied nothing; ask again later for the first
    one's outcome, with the same key (the provider then answers with that outcome)."""

    reason = "in_progress"


class Shed(RejectedError):
    """Dropped on purpose under load to save higher-priority work: HTTP 503."""

    reason = "shed"

    def __init__(
        self,
        message: str | None = None,
        *,
        priority: object = None,
        retry_after: float | None = None,
        dependency: str | None = None,
    ) -> None:
        self.priority = priority
        if message is None and priority is not None:
            name = getattr(priority, "name", str(priority))
            message = f"{self.reason.replace('_', ' ')} priority {name}"
            if dependency:
                message = f"{dependency}: {message}"
        super().__init__(message, retry_after=retry_after, dependency=dependency)


class Backpressure(Shed):
    """Shed because a downstream queue is too deep: the producer should slow down."""

    reason = "backpressure"


class DeadlineExceeded(TransientError):
    """The total time budget for the call is spent."""


class AttemptTimeout(DeadlineExceeded):
    """One attempt ran past its per-attempt timeout (the budget may allow another)."""


class LateResult(AttemptTimeout):
    """An attempt returned, but after its timeout (cooperative mode). ``result`` is what it
    returned: a call that may not be retried gets it back (its effect happened), the rest
    treat it as the timeout it is."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class RetriesExhausted(TransientError):
    """Every allowed attempt failed with a transient error; ``last_exception`` says why."""

    def __init__(
        self,
        message: str | None = None,
        *,
        last_exception: BaseException | None = None,
        attempts: int = 0,
        dependency: str | None = None,
    ) -> None:
        self.last_exception = last_exception
        self.attempts = attempts
        self.dependency = dependency
        if message is None:
            who = f"{dependency}: " if dependency else ""
            last = (
                f": {type(last_exception).__name__}: {last_exception}"
                if last_exception is not None
                else ""
            )
            message = f"{who}retries exhausted after {attempts} attempt(s){last}"
        super().__init__(message)

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class NotIdempotent(PermanentError):
    """A retry was asked for a non-idempotent call that carries no idempotency key."""


class DeferralError(TidegateError):
    """The queue-for-later store failed: the request was NOT stored."""
