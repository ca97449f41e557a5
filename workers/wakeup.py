"""A worker bootstep that keeps the consumer's event loop waking once a second.

kombu's hub sleeps in ``poll()`` until its next timer, up to 10 s, and a signal does not cut
that sleep short (Python retries an interrupted ``poll``, PEP 475). With RabbitMQ and nothing
else scheduled, a warm shutdown (SIGTERM) therefore waited up to 10 s before the loop noticed
it, on every deploy and every scale-down. The Redis transport has its own 1 s cycle; this
gives every transport the same bound.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

__all__ = ["WAKE_EVERY_S", "LoopWakeup"]

WAKE_EVERY_S = 1.0


def _noop() -> None:
    """Nothing to do: the timer only bounds how long the loop's poll() may sleep."""


class LoopWakeup(bootsteps.StartStopStep):
    """Schedules a no-op timer on the consumer's hub (when it runs one)."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer: Any = None

    def start(self, parent: Any) -> None:
        hub = getattr(parent, "hub", None)
        if hub is not None and self.timer is None:
            self.timer = hub.call_repeatedly(WAKE_EVERY_S, _noop)

    def stop(self, parent: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    shutdown = stop
