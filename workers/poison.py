"""Poison messages: what Celery would log and discard goes to the dead-letter queue instead.

Celery's consumer drops a message whose body cannot be decoded, whose task name is unknown,
or that is not a task message at all (``on_decode_error`` / ``on_unknown_task`` /
``on_unknown_message`` log it and ack or reject it). This consumer looks at each message
before Celery's handler does; a poison message is published to its queue's DLQ, with the
reason, and only then acked, and the worker goes on consuming. Arguments that do not fit the
task's signature are caught here too, before a worker slot is spent on them. And each message's
time limits are capped at this worker's (:func:`clamp_time_limits`).

Installed by ``worker_consumer`` in :mod:`workers.application`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from workers import deadletter as dl
from workers import headers as h
from workers.brokers import broker_for
from workers.errors import DeadLettered
from workers.installation import installation
from workers.qos import LoopThreadQos
from workers.topology import DLQ_SUFFIX

log = logging.getLogger("tidegate.worker")


class Poison(Exception):
    """Why a message cannot run: ``reason`` is one of the dead-letter reasons."""

    def __init__(self, reason: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.fields = fields


def _origin_queue(app: Any, message: Any, task: str | None) -> str:
    topology = installation(app).topology
    queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    if queue in topology.work_queues:
        return queue
    return topology.queue_for_task(task) if task else topology.work_queues[-1]


def signature_of(task: Any) -> inspect.Signature:
    """The task's call signature, computed once per task object (it is on every path)."""
    cached = task.__dict__.get("_tidegate_signature")
    if cached is None:
        cached = inspect.signature(task.run)
        task.__dict__["_tidegate_signature"] = cached
    return cached


def check_message(app: Any, message: Any) -> None:
    """Raise :class:`Poison` if ``message`` cannot run as a task of ``app``."""
    headers = message.headers if isinstance(message.headers, dict) else None
    if headers is None or "task" not in headers:
        # Not a protocol-2 task message: Celery may still read it as protocol 1.
        try:
            payload = message.decode()
        except Exception as exc:
            raise Poison(dl.UNDECODABLE, f"body cannot be decoded: {exc}") from exc
        if not (isinstance(payload, dict) and "task" in payload):
            raise Poison(dl.UNDECODABLE, "not a task message (no task name in headers or body)")
        return
    name = headers["task"]
    task = app.tasks.get(name)
    if task is None or str(name).startswith("celery."):
        raise Poison(dl.UNKNOWN_TASK, f"no task named {name!r} is registered", task=name)
    try:
        body = message.decode()
    except Exception as exc:
        raise Poison(dl.UNDECODABLE, f"body cannot be decoded: {exc}", task=name) from exc
    if not (isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[0], list | tuple)
            and isinstance(body[1], dict)):
        raise Poison(dl.UNDECODABLE, "body is not [args, kwargs, embed]", task=name)
    try:
        signature_of(task).bind(*body[0], **body[1])
    except TypeError as exc:
        raise Poison(dl.INVALID_ARGUMENTS, f"{name}: {exc}", task=name, args=list(body[0]),
                     kwargs=dict(body[1])) from exc
    except ValueError:  # no signature to check (a C function): let it run
        return


def dead_letter_poison(app: Any, message: Any, poison: Poison,
                       hostname: str | None = None) -> dl.DeadLetter:
    headers = message.headers if isinstance(message.headers, dict) else {}
    task = poison.fields.get("task")
    record = dl.DeadLetter(
        reason=poison.reason, queue=_origin_queue(app, message, task), task=task,
        task_id=headers.get("id"), args=poison.fields.get("args", []),
        kwargs=poison.fields.get("kwargs", {}),
        headers={k: v for k, v in headers.items() if k.startswith("tidegate_")},
        idempotency_key=headers.get(h.IDEMPOTENCY_KEY),
        idempotent=getattr(app.tasks.get(task), "idempotent", None) if task else None,
        attempts=int(headers.get("retries") or 0) + 1,
        first_seen=headers.get(h.FIRST_SEEN) or headers.get(h.ENQUEUED_AT),
        raw_body=None if poison.reason == dl.INVALID_ARGUMENTS else dl._text(message.body),
        worker=hostname or dl.socket.gethostname(),
    ).with_error(poison)
    dl.DeadLetters(app).publish(record)
    return record


def report_failure(app: Any, dispatcher: Any, message: Any, record: dl.DeadLetter) -> None:
    """What Celery would have recorded had the task run and failed: a ``task-failed`` event
    (Flower, ``celery events``) and FAILURE in the result backend where the message asked for
    a result. Best effort: the record is safely in the DLQ already."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    if not record.task_id:
        return
    exc = DeadLettered(f"{record.reason}: {record.exception_type}: "
                       f"{(record.exception_message or '')[:500]} (dead-lettered to "
                       f"{record.queue}{DLQ_SUFFIX}, record {record.id})", record.reason,
                       record.id)
    try:
        if dispatcher is not None and dispatcher.enabled:
            dispatcher.send("task-failed", uuid=record.task_id, name=record.task,
                            exception=repr(exc), traceback="")
        task = app.tasks.get(record.task) if record.task else None
        wants = headers.get("ignore_result")
        if app.conf.result_backend and (wants is False or (
                wants is None and task is not None and not task.ignore_result)):
            app.backend.mark_as_failure(record.task_id, exc)
    except Exception as err:  # a monitor or backend down must not undo the dead letter
        log.warning("dead letter %s not reported to Celery: %s", record.id, err)
    from workers.jobs import count_outcome
    from workers.policies import state_for

    count_outcome(record.queue, "dead_lettered")
    try:
        jobs = state_for(app).jobs
    except Exception as err:  # the worker's state cannot be built: no status, the DLQ holds it
        log.warning("dead letter %s: no job status: %s", record.id, err)
        return
    if jobs is not None:
        jobs.write(record.task_id, "dead_lettered", task=record.task, queue=record.queue,
                   reason=record.reason, record=record.id, dlq=f"{record.queue}{DLQ_SUFFIX}",
                   error=f"{record.exception_type}: {record.exception_message}"[:500])


class PoisonAwareConsumer(LoopThreadQos):
    """Celery's consumer, with poison messages dead-lettered instead of dropped (and prefetch
    changes kept on the loop thread: :mod:`workers.qos`), without native delayed delivery."""

    class Blueprint(LoopThreadQos.Blueprint):
        # Celery's DelayedDelivery step (started when any queue is a quorum queue) routes
        # countdowns through topic exchanges only; Tidegate's per-queue exchanges are direct,
        # so it never applies, yet it declared 28 quorum queues and, after each reconnect,
        # retried every node of the failover list, a dead one for 17 s before consuming
        # again (tests/drills/test_quorum_failover.py; docs/ha.md).
        default_steps = [step for step in LoopThreadQos.Blueprint.default_steps
                         if not step.endswith(":DelayedDelivery")]

    def create_task_handler(self, *args: Any, **kwargs: Any):
        handle = super().create_task_handler(*args, **kwargs)
        app, hostname = self.app, self.hostname

        def on_task_received(message: Any) -> Any:
            try:
                check_message(app, message)
            except Poison as poison:
                try:
                    record = dead_letter_poison(app, message, poison, hostname)
                except dl.DeadLetterError as err:
                    requeue = not broker_for(installation(app).settings).dead_letters_natively
                    log.error("poison message not dead-lettered (%s); rejecting, requeue=%s",
                              err, requeue)
                    message.reject(requeue=requeue)
                    return None
                message.ack()
                log.error("poison message dead-lettered as %s (record %s): %s", poison.reason,
                          record.id, poison)
                report_failure(app, getattr(self, "event_dispatcher", None), message, record)
                return None
            clamp_time_limits(message.headers, app.conf.task_time_limit,
                              app.conf.task_soft_time_limit)
            return handle(message)

        return on_task_received


def clamp_time_limits(headers: Any, hard: float | None, soft: float | None) -> None:
    """Cap a message's ``timelimit`` header at this worker's own limits.

    Celery copies the *producer's* configured limits into every message and they win over
    the worker's; the worker's visibility timeout is only safe above the worker's hard limit,
    so a message may ask for shorter limits, never longer ones.
    """
    if not isinstance(headers, dict) or "task" not in headers:
        return
    asked = headers.get("timelimit") or (None, None)
    try:
        asked_hard, asked_soft = asked
    except (TypeError, ValueError):
        asked_hard = asked_soft = None

    def cap(value: Any, limit: float | None) -> float | None:
        if not isinstance(value, int | float) or value <= 0:
            return limit
        return min(value, limit) if limit else value

    headers["timelimit"] = [cap(asked_hard, hard), cap(asked_soft, soft)]
