"""Prefetch changes on the consumer's own thread: a workaround for a Celery 5.x bug.

After a broker connection restart Celery (since 5.3, ``worker_enable_prefetch_count_reduction``,
on by default) lowers the prefetch count by the number of tasks still running and raises it
again by one on each of their acks: ``Consumer._restore_prefetch_count_after_connection_restart``
is chained as a ``vine`` promise callback on the ack. The promise fires in the thread that acks
the message; with the ``threads`` pool that is the pool thread that ran the task, so it calls
``basic.qos`` (a synchronous AMQP round trip, under the QoS mutex) on the consumer's channel
from a pool thread, while the worker's main loop reads the same socket. py-amqp is not
thread-safe: the two threads steal each other's frames. The QoS-OK reply is consumed by the
main loop, so the pool thread waits for it forever holding the QoS mutex; the main loop then
blocks on that mutex in its own ``basic.qos`` (the prefetch update at the top of each loop
iteration) and the worker consumes nothing, or a frame arrives out of order
(``UnexpectedFrame``) and the connection drops again. Seen with Celery 5.7.0, kombu 5.7.0,
py-amqp 5.4.2 on RabbitMQ 3.10 (global QoS: the reduction runs; under per-consumer QoS
Celery skips it since celery/celery#10253). The prefork, solo and green pools ack on the main
loop already, so only ``threads`` is hit.

The fix keeps Celery's reduction and moves the restore step onto the consumer's loop thread
(``call_soon``: kombu's hub wakes its loop for a callback from another thread). Called on that
thread already, nothing changes. ``tests/unit/test_qos_restore_thread.py`` fails if a Celery
upgrade renames the method this relies on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger("tidegate.worker")

RESTORE = "_restore_prefetch_count_after_connection_restart"  # Celery's private name


class LoopThreadQos(Consumer):
    """Celery's consumer, with every prefetch-count change made on its own loop thread."""

    _loop_thread: int | None = None

    def start(self) -> Any:
        self._loop_thread = threading.get_ident()
        return super().start()

    def _restore_prefetch_count_after_connection_restart(self, p: Any, *args: Any) -> Any:
        if self._loop_thread in (None, threading.get_ident()):
            return super()._restore_prefetch_count_after_connection_restart(p, *args)
        self.call_soon(self._restore_on_loop)
        return None

    def _restore_on_loop(self) -> None:
        try:
            super()._restore_prefetch_count_after_connection_restart(None)
        except tuple(self.connection_errors) + tuple(self.channel_errors) as exc:
            # The connection went again meanwhile: the next one starts from its own count.
            log.warning("prefetch count not restored (connection lost again): %r", exc)
