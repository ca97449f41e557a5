"""Errors of the Celery side, as branches of the one tree in :mod:`resilience.errors`."""

from __future__ import annotations

from resilience.errors import ConfigError, PermanentError, TransientError

__all__ = ["BrokerUnavailable", "DeadLettered", "InvalidPayload", "UnknownQueue", "UnknownTask"]


class BrokerUnavailable(TransientError):
    """The broker could not be reached (or did not confirm the publish) within the timeout."""


class UnknownTask(PermanentError):
    """No task of that name is registered: it would sit in a queue that nobody consumes."""


class UnknownQueue(ConfigError):
    """A queue that the topology does not declare."""


class InvalidPayload(PermanentError):
    """Arguments that are not JSON, too large, or do not fit the task's signature."""


class DeadLettered(PermanentError):
    """Raised by a resilient task once its message is safely in its DLQ: Celery then records
    the task as FAILURE (``task-failed`` event, result backend) with the DLQ reason, where a
    return value would have read as SUCCESS. Its one argument is the message, so Celery's JSON
    exception format rebuilds it; ``reason`` and ``record_id`` are for Python callers."""

    def __init__(self, message: str, reason: str | None = None,
                 record_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.record_id = record_id
