"""SQS: a worker keeps the messages it holds invisible while it lives, and only while it lives.

Why: SQS hides a received message for the queue's visibility timeout and then delivers it
again, whoever holds it. A long timeout makes a dead worker's tasks wait that long; a short
one redelivers long tasks, and the retry countdowns a worker holds, while they still run.

How: the queues' visibility timeout is short (``TIDEGATE_SQS_VISIBILITY_TIMEOUT_S``, 20 s) and
each worker process, from a thread of its own, extends every message it holds (received and
not yet acked: running, waiting for a pool slot, or a countdown held until its ETA) with
``ChangeMessageVisibilityBatch`` every heartbeat (5 s), to the full timeout again. A worker
that dies stops extending, so its messages are back within the timeout; one that lives never
lets them go, however long its tasks run. A handle that fails (acked meanwhile) is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["BATCH", "VisibilityExtender", "held_messages"]

log = logging.getLogger(__name__)

BATCH = 10  # SQS's limit per ChangeMessageVisibilityBatch


def held_messages(consumer: Any) -> list[Any]:
    """The messages a Celery consumer holds unacked on its task channel (kombu's QoS)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    delivered = getattr(getattr(channel, "qos", None), "_delivered", None)
    if not delivered:
        return []
    for _ in range(3):  # another thread acking mid-copy: copy again
        try:
            return list(delivered.values())
        except RuntimeError:
            continue
    return []


class VisibilityExtender:
    """Extends the visibility of every message ``held()`` returns, batched per queue."""

    def __init__(self, client: Any, held: Callable[[], Iterable[Any]], timeout_s: int) -> None:
        self.client, self.held, self.timeout_s = client, held, int(timeout_s)

    def extend(self) -> int:
        """One pass; returns how many messages were extended."""
        by_queue: dict[str, list[str]] = {}
        for message in self.held():
            info = getattr(message, "delivery_info", None) or {}
            url, sqs_message = info.get("sqs_queue"), info.get("sqs_message")
            handle = sqs_message.get("ReceiptHandle") if isinstance(sqs_message, dict) else None
            if url and handle:
                by_queue.setdefault(url, []).append(handle)
        extended = 0
        for url, handles in by_queue.items():
            for start in range(0, len(handles), BATCH):
                entries = [{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": self.timeout_s}
                           for i, h in enumerate(handles[start:start + BATCH])]
                reply = self.client.change_message_visibility_batch(QueueUrl=url,
                                                                    Entries=entries)
                failed = reply.get("Failed") or []
                extended += len(entries) - len(failed)
                for f in failed:  # acked or released meanwhile: nothing left to keep
                    log.debug("visibility not extended: %s %s", f.get("Code"), f.get("Message"))
        return extended
