"""Tidegate's resilience patterns: framework-free, sync and asyncio.

Import what you need from the submodules (``resilience.policy``, ``resilience.breaker``, ...);
this package root re-exports only the errors, deadlines and priorities (cheap to import).

Importing the package subscribes Prometheus metrics and logs to the default event bus
(:data:`resilience.events.EVENTS`): layers emit events, and these are their subscribers.
"""

from . import logs as _logs
from . import metrics as _metrics
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

# the default subscribers (layers never touch a metric or a log line themselves)
_metrics.subscribe()
_logs.subscribe()

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
