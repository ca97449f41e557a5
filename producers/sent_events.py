"""``task-sent`` events published without a publisher confirm, on a connection of their own.

Why: with ``confirm_publish`` (Tidegate's RabbitMQ transport option), Celery publishes a
job's ``task-sent`` event on the job's own confirm-mode channel, so every ``send_task``
waits for two confirms: the job's and the event's. The event is a transient monitoring
message (delivery mode 1, for Flower and ``celery events``); its confirm proves nothing a
caller acts on, yet it is half of a single enqueue's wall time on RabbitMQ. Worse, an event
that fails after the job was confirmed made ``send_task`` raise, and the caller was told
the job was refused although it is on its queue.

How: Celery's ``send_task_message`` takes an ``event_dispatcher``; :class:`SentEvents` is
one whose ``publish`` ignores the job's producer and writes the event on a channel without
confirms (one ``sendall``, no wait). The event still goes out after its job's confirm, so
an event never names a job the broker refused. A failure is logged and the event dropped
(after one fresh connection), never the job's. Used where the broker confirms publishes
and task events are on (``producers.publishing``).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

from celery import Celery

__all__ = ["SentEvents", "sent_events_for"]

log = logging.getLogger("producers.producer")


def sent_events_for(app: Celery) -> SentEvents | None:
    """A dispatcher for ``app``'s ``task-sent`` events where its publishes wait for confirms
    and it sends those events; None where Celery's own dispatcher costs nothing extra."""
    options = app.conf.broker_transport_options or {}
    if not app.conf.task_send_sent_event or not options.get("confirm_publish"):
        return None
    return SentEvents(app)


class SentEvents:
    """Celery's event dispatcher for ``task-sent``, on an unconfirmed channel (thread-safe,
    one connection per process)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        # Celery's own dispatcher builds the event (clock, hostname, fields, serializer) and
        # publishes it with the producer it is handed: ours. enabled=False: it opens nothing;
        # no buffering while offline: a failed publish must raise here, to be retried once.
        self._dispatcher = app.events.Dispatcher(enabled=False, buffer_while_offline=False)
        self._lock = threading.Lock()
        self._line = _Line()
        # a dropped Producer's events connection is closed with it, not left to the process
        weakref.finalize(self, self._line.close)
        self.dropped = 0  # events given up on (logged)

    def publish(self, type: str, fields: dict[str, Any], producer: Any = None,
                **kwargs: Any) -> None:
        """Celery's ``EventDispatcher.publish`` signature; ``producer`` (the job's, in
        confirm mode) and Celery's retry options are not used: one fresh connection is
        this one's retry. Never raises: the job is already confirmed."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._dispatcher.publish(type, fields, self._line.producer(self.app),
                                             retry=False)
                    return
                except Exception as exc:  # a broken connection: a fresh one, once
                    self._line.close()
                    if attempt == 2:
                        self.dropped += 1
                        log.warning("%s event for %s not published (the job is queued): %s",
                                    type, fields.get("uuid"), exc)



class _Line:
    """The events connection and its producer (apart from SentEvents, for its finalizer)."""

    def __init__(self) -> None:
        self.conn: Any = None
        self._producer: Any = None
        self.pid = 0

    def producer(self, app: Celery) -> Any:
        if self._producer is None or self.pid != os.getpid():
            # heartbeat 0: a connection that only writes never reads the server's heartbeats,
            # and the server would close it after two missed intervals while it sits idle
            self.conn = app.connection_for_write(
                heartbeat=0, transport_options={"confirm_publish": False})
            self.conn.connect()  # one attempt: kombu's default channel would retry forever
            self._producer = self.conn.Producer()
            self.pid = os.getpid()
        return self._producer

    def close(self) -> None:
        conn, self.conn, self._producer = self.conn, None, None
        if conn is not None and self.pid == os.getpid():  # never a parent's, after a fork
            try:
                conn.release()
            except Exception:  # already broken: nothing to release
                log.debug("closing the events connection", exc_info=True)
