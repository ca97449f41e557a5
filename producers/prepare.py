"""Validation and preparation of one job before any gate or broker sees it.

A task the app does not know, a payload that is not JSON or is too big, a queue the policy
file does not declare, a bad deadline or idempotency key: each is refused here with a typed
error (``UnknownTask``, ``InvalidPayload``, ``UnknownQueue``), so nothing doubtful reaches a
broker. A mixin of :class:`~producers.producer.Producer`, which holds the app, its topology
and the message size limit it reads.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from celery import Celery

from resilience.errors import ConfigError
from resilience.shedding import Priority
from workers.errors import InvalidPayload, UnknownQueue, UnknownTask
from workers.topology import Topology

from .model import Job, Prepared

__all__ = ["Preparing"]


class Preparing:
    """``Producer``'s validation: every enqueue starts with :meth:`_prepare`."""

    app: Celery
    topology: Topology
    max_message_bytes: int

    def task_names(self) -> list[str]:
        return sorted(n for n in self.app.tasks if not n.startswith("celery."))

    def _check_task(self, task: str) -> None:
        if not isinstance(task, str) or task not in self.app.tasks or task.startswith("celery."):
            raise UnknownTask(f"unknown task {task!r}; known: {', '.join(self.task_names())}")

    def _check_payload(self, args: Any, kwargs: Any) -> None:
        if not isinstance(args, list | tuple):
            raise InvalidPayload(f"args must be a JSON array, got {type(args).__name__}")
        if not isinstance(kwargs, dict):
            raise InvalidPayload(f"kwargs must be a JSON object, got {type(kwargs).__name__}")
        try:
            size = len(json.dumps([list(args), kwargs], allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"arguments are not JSON-serialisable: {exc}") from None
        if size > self.max_message_bytes:
            raise InvalidPayload(
                f"payload is {size} bytes; the limit is {self.max_message_bytes} bytes"
            )

    def _queue_of(self, task: str) -> str:
        """The task's queue by the policy file's patterns, remembered per task name (a known
        task: the cache is as big as the app's task list; the match is an fnmatch loop)."""
        cache: dict[str, str] = self.__dict__.setdefault("_queue_cache", {})
        found = cache.get(task)
        if found is None:
            found = cache[task] = self.topology.queue_for_task(task)
        return found

    def _prepare(self, task: str, args: Any, kwargs: Any, priority: Any,
                 idempotency_key: str | None, queue: str | None, deadline_s: float | None,
                 task_id: str | None) -> Prepared:
        kwargs = {} if kwargs is None else kwargs
        prio = Priority.parse(priority)
        self._check_task(task)
        self._check_payload(args, kwargs)
        target = queue or self._queue_of(task)
        try:
            self.topology.check_queue(target)
        except ConfigError as exc:
            raise UnknownQueue(str(exc)) from None
        if deadline_s is not None and not deadline_s > 0:
            raise InvalidPayload(f"deadline must be > 0 seconds, got {deadline_s!r}")
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 255
        ):
            raise InvalidPayload("idempotency_key must be a string of 1-255 characters")
        return Prepared(task, list(args), dict(kwargs), prio, target, idempotency_key,
                         deadline_s, task_id or str(uuid.uuid4()), time.monotonic(),
                         fresh_id=task_id is None)

    def _prepare_job(self, job: Job) -> Prepared:
        return self._prepare(job.task, job.args, job.kwargs, job.priority, job.idempotency_key,
                             job.queue, job.deadline_s, job.task_id)
