"""Tidegate's resilience patterns: framework-free, sync and asyncio.

Import what you need from the submodules (``resilience.policy``, ``resilience.breaker``, ...);
this package root re-exports only the errors, deadlines and priorities (cheap to import).
"""

from .deadline import Deadline, client_timeout, deadline_scope, remaining
from .errors import (
    AttemptTimeout,
    Backpressure,
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    DeferralError,
    NotIdempotent,
    PermanentError,
    RateLimited,
    RejectedError,
    RetriesExhausted,
    Shed,
    TidegateError,
    TransientError,
)
from .shedding import LoadShedder, Priority

__all__ = [
    "AttemptTimeout",
    "Backpressure",
    "BulkheadFull",
    "CircuitOpen",
    "ConfigError",
    "Deadline",
    "DeadlineExceeded",
    "DeferralError",
    "LoadShedder",
    "NotIdempotent",
    "PermanentError",
    "Priority",
    "RateLimited",
    "RejectedError",
    "RetriesExhausted",
    "Shed",
    "TidegateError",
    "TransientError",
    "client_timeout",
    "deadline_scope",
    "remaining",
]
