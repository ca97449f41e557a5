"""Enqueue jobs onto the work queues, refusing bad input before it reaches a broker.

Every call validates the task name, the queue and the JSON payload, publishes with publisher
confirms where the broker has them, and turns a broker that cannot be reached within the
connect timeout into :class:`~workers.errors.BrokerUnavailable`, never a hang.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from resilience.errors import ConfigError
from resilience.shedding import Priority
from workers import headers as h
from workers.errors import BrokerUnavailable, InvalidPayload, UnknownQueue, UnknownTask
from workers.topology import broker_priority

State = Literal["queued", "deferred"]


@dataclass(frozen=True)
class EnqueueResult:
    """What happened to one enqueue: its task id, state and queue."""

    id: str
    state: State
    queue: str
    task: str
    priority: Priority
    idempotency_key: str | None = None


class Producer:
    """Publishes tasks for the workers. Thread-safe; one per process is plenty."""

    def __init__(self, app: Celery | None = None, *, max_message_bytes: int | None = None):
        if app is None:
            from workers import app as default_app

            app = default_app
        self.app = app
        self.settings = app.tidegate_settings
        self.topology = app.tidegate_topology
        self.max_message_bytes = max_message_bytes or self.settings.api_max_body_bytes
        app.loader.import_default_modules()

    # -- validation -------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return sorted(n for n in self.app.tasks if not n.startswith("celery."))

    def _check_task(self, task: str) -> None:
        if task not in self.app.tasks or task.startswith("celery."):
            raise UnknownTask(f"unknown task {task!r}; known: {', '.join(self.task_names())}")

    def _check_payload(self, args: Any, kwargs: Any) -> None:
        if not isinstance(args, list | tuple):
            raise InvalidPayload(f"args must be a JSON array, got {type(args).__name__}")
        if not isinstance(kwargs, dict):
            raise InvalidPayload(f"kwargs must be a JSON object, got {type(kwargs).__name__}")
        try:
            size = len(json.dumps([list(args), kwargs]).encode())
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"arguments are not JSON-serialisable: {exc}") from None
        if size > self.max_message_bytes:
            raise InvalidPayload(
                f"payload is {size} bytes; the limit is {self.max_message_bytes} bytes"
            )

    # -- publishing -------------------------------------------------------------------------
    def enqueue(
        self,
        task: str,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        priority: Priority | str | int = Priority.HIGH,
        idempotency_key: str | None = None,
        queue: str | None = None,
        deadline_s: float | None = None,
        task_id: str | None = None,
    ) -> EnqueueResult:
        """Publish one task; raise a typed error instead of publishing anything doubtful."""
        kwargs = {} if kwargs is None else kwargs
        prio = Priority.parse(priority)
        self._check_task(task)
        self._check_payload(args, kwargs)
        target = queue or self.topology.queue_for_task(task)
        try:
            self.topology.check_queue(target)
        except ConfigError as exc:
            raise UnknownQueue(str(exc)) from None
        if deadline_s is not None and not deadline_s > 0:
            raise InvalidPayload(f"deadline must be > 0 seconds, got {deadline_s!r}")
        now = time.time()
        message_headers = {
            h.PRIORITY: prio.name,
            h.ENQUEUED_AT: now,
            h.IDEMPOTENCY_KEY: idempotency_key,
            h.DEADLINE: now + deadline_s if deadline_s else None,
        }
        task_id = task_id or str(uuid.uuid4())
        try:
            self.app.send_task(
                task, args=list(args), kwargs=kwargs, task_id=task_id, queue=target,
                priority=broker_priority(prio, self.settings.transport),
                headers={k: v for k, v in message_headers.items() if v is not None},
                retry=False,
            )
        except (OperationalError, KombuError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"broker unreachable at {self._safe_broker()}: {exc}"
            ) from None
        return EnqueueResult(task_id, "queued", target, task, prio, idempotency_key)

    def _safe_broker(self) -> str:
        """The broker URL without its password, for error messages and logs."""
        return self.app.connection_for_write().as_uri(include_password=False)
