"""Errors of the Celery side, as branches of the one tree in :mod:`resilience.errors`."""

from __future__ import annotations

from resilience.errors import ConfigError, PermanentError, TransientError

__all__ = ["BrokerUnavailable", "InvalidPayload", "UnknownQueue", "UnknownTask"]


class BrokerUnavailable(TransientError):
    """The broker could not be reached (or did not confirm the publish) within the timeout."""


class UnknownTask(PermanentError):
    """No task of that name is registered: it would sit in a queue that nobody consumes."""


class UnknownQueue(ConfigError):
    """A queue that the topology does not declare."""


class InvalidPayload(PermanentError):
    """Arguments that are not JSON, too large, or do not fit the task's signature."""
