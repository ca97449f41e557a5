"""One delivery of a resilient task, read from its message, and the job status it writes.

:class:`Execution` is what the chain (``workers.steps``) and the outcome decision
(``workers.outcomes``) need to know about the delivery in progress: who it is (task, id,
queue), what it carries (arguments, the ``tidegate_*`` headers, the idempotency key, the
priority, the attempt number) and what happened so far (a write attempted, fallbacks
served, attempts made). :func:`execution_of` builds it from Celery's request;
:func:`job_status` records each step of it in ``workers.jobs``.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from resilience.fallback import replay_lineage
from resilience.shedding import Priority
from workers import headers as h
from workers.brokers import BrokerAdapter, broker_for
from workers.idempotency import mark_key
from workers.installation import installation
from workers.jobs import count_outcome
from workers.policies import WorkerState, state_for

if TYPE_CHECKING:
    from workers.resilient import ResilientTask

__all__ = ["Execution", "TaskStatics", "attempt_of", "current_execution", "execution_of",
           "job_status", "job_status_due", "lineage_of", "statics_of"]

CURRENT: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
    "tidegate_execution", default=None
)


@dataclass
class Execution:
    """One delivery of one task: what the chain and the outcome decision need to know."""

    task: str
    task_id: str
    queue: str
    args: tuple
    kwargs: dict
    headers: dict
    idempotency_key: str | None
    idempotent: bool  # declared idempotent, or carries an idempotency key
    attempt: int  # the job's attempt number at the start of this delivery (1-based)
    max_attempts: int
    priority: Priority
    first_seen: float
    worker: str
    redelivered: bool = False  # the broker says an earlier delivery was not acked
    fresh: bool = False  # first delivery of a task id the Producer generated (h.FRESH_ID)
    effect_attempted: bool = False  # a write reached (or may have reached) a dependency
    reached_before: bool = False  # an earlier delivery's write did (h.REACHED, a started mark)
    leased: bool = False  # this delivery holds its mark's run lease (workers.idempotency)
    fallbacks: list[str] = field(default_factory=list)
    calls: int = 0  # attempts on the task's own dependency in this delivery (its largest step)

    @property
    def mark(self) -> str:
        return mark_key(self.idempotency_key, self.task_id)

    @property
    def reads_mark(self) -> bool:
        """Whether taking the mark must read what is there first.

        Not for idempotent work without a key on its first delivery of a fresh id: no other
        message carries that id, so no mark can exist yet, and a "started" mark would change
        nothing (idempotent work runs again after a lost worker). It still gets its "done" mark.
        """
        return not (self.idempotent and self.idempotency_key is None and self.fresh)

    @property
    def attempts_used(self) -> int:
        """The job's attempts so far, this delivery's included (a delivery counts as one
        even when it was refused before any call)."""
        return self.attempt - 1 + max(1, self.calls)

    @property
    def attempts_left(self) -> int:
        """What this delivery's steps may still make (at least the one they are in)."""
        return max(1, self.max_attempts - (self.attempt - 1))

    @property
    def last_attempt(self) -> bool:
        return self.attempts_used >= self.max_attempts


class TaskStatics(NamedTuple):
    """What every delivery of one task shares (:func:`statics_of`)."""

    home_queue: str  # where the policy file routes the task
    work_queues: frozenset[str]
    max_attempts: int
    honours_fresh_ids: bool  # the broker flags redeliveries, so h.FRESH_ID can be trusted
    broker: BrokerAdapter  # how to read a message's broker priority
    # (state db, broker db) where the message's ack can follow the done mark in its socket
    # write (workers.ack_writes): the state on the Redis broker's own server
    ack_dbs: tuple[int, int] | None



def current_execution() -> Execution | None:
    """The delivery running in this context, if any."""
    return CURRENT.get()


def lineage_of(ex: Execution) -> contextlib.AbstractContextManager[None]:
    """A replayed request runs under its deferral history, so deferring it again continues
    the count (and the cap) instead of starting over (see resilience.fallback)."""
    deferrals = ex.headers.get(h.DEFERRALS)
    try:
        count = int(deferrals) if deferrals is not None else 0
    except (TypeError, ValueError):
        count = 0
    if count <= 0:
        return contextlib.nullcontext()
    first = ex.headers.get(h.FIRST_DEFERRED_AT)
    return replay_lineage(count, float(first) if isinstance(first, int | float) else None)


def job_status_due(state: WorkerState, ex: Execution, status: str, **fields: Any
             ) -> tuple[Any, ...] | None:
    """This delivery's job-status ``SET`` to send with the mark's own write, or None where
    it cannot ride along (no statuses, paused, or not the idempotency store's Redis)."""
    jobs = state.jobs
    if jobs is None or jobs.client is not state.idempotency.client:
        return None
    return jobs.due(ex.task_id, status, task=ex.task, queue=ex.queue, **fields)


def job_status(state: WorkerState, ex: Execution, status: str, **fields: Any) -> None:
    """Record this delivery's job status (``workers.jobs``): a socket write, never raises."""
    count_outcome(ex.queue, status)
    if state.jobs is not None:
        state.jobs.write(ex.task_id, status, task=ex.task, queue=ex.queue, **fields)


def attempt_of(headers: dict, request: Any) -> int:
    """The job's attempt number: the header a retry carries (in-call attempts included),
    else one past Celery's count of retries."""
    carried = headers.get(h.ATTEMPT)
    if isinstance(carried, int) and not isinstance(carried, bool) and carried >= 1:
        return carried
    return (request.retries or 0) + 1


def statics_of(task: ResilientTask) -> TaskStatics:
    """What every delivery of this task shares: worked out on the first one."""
    static: TaskStatics | None = task.__dict__.get("_tidegate_static")
    if static is None:
        config = state_for(task.app).configs.get(task.dependency or "")
        installed = installation(task.app)
        topology = installed.topology
        broker = broker_for(installed.settings)
        static = task._tidegate_static = TaskStatics(
            home_queue=topology.queue_for_task(task.name),
            work_queues=frozenset(topology.work_queues),
            max_attempts=config.retry_config.max_attempts if config else 1,
            # only where the broker flags redeliveries (SQS does not): a repeat looks fresh
            honours_fresh_ids=broker.flags_redelivery,
            broker=broker,
            ack_dbs=_ack_dbs(task, installed.settings, broker),
        )
    return static


def _ack_dbs(task: ResilientTask, settings: Any, broker: BrokerAdapter
             ) -> tuple[int, int] | None:
    """Where the done mark may ride in the ack (``workers.ack_writes``): a task acked late,
    the state store's reply-later line on the broker's server, no key prefix (kombu's client
    would prefix the ack's keys; the line's commands are not)."""
    idem = state_for(task.app).idempotency
    if not task.acks_late or idem.replies is None or (
            task.app.conf.broker_transport_options or {}).get("global_keyprefix"):
        return None
    return broker.status_dbs(settings, idem.client)


def execution_of(task: ResilientTask, args: tuple, kwargs: dict) -> Execution:
    """The delivery in ``task.request``: its ``tidegate_*`` headers, key, priority (the
    header, else the broker's own number on its scale), queue and attempt number."""
    req = task.request
    static = statics_of(task)
    tidegate = {n: v for n in h.ALL if (v := h.read(req, n)) is not None}
    key = h.idempotency_key(req, kwargs.get("idempotency_key"))
    delivery = req.delivery_info or {}
    try:
        # a plain send_task carries only the broker's number: read it on that broker's scale
        priority = Priority.parse(tidegate[h.PRIORITY]) if h.PRIORITY in tidegate else (
            static.broker.priority_from(delivery.get("priority"))
            or Priority.HIGH)
    except Exception:
        priority = Priority.HIGH
    redelivered = bool(delivery.get("redelivered"))
    queue = delivery.get("routing_key") or static.home_queue
    if queue not in static.work_queues:  # a DLQ replay, or a routing key of its own
        queue = static.home_queue
    return Execution(
        task=task.name, task_id=req.id or "", queue=queue, args=tuple(args),
        kwargs=dict(kwargs), headers=tidegate, idempotency_key=key,
        idempotent=bool(task.idempotent or key), attempt=attempt_of(tidegate, req),
        max_attempts=static.max_attempts, priority=priority,
        first_seen=float(tidegate.get(h.FIRST_SEEN) or tidegate.get(h.ENQUEUED_AT)
                         or time.time()),
        worker=req.hostname or "-", redelivered=redelivered,
        fresh=(not redelivered and static.honours_fresh_ids
               and bool(h.read(req, h.FRESH_ID))),
        reached_before=bool(tidegate.get(h.REACHED)),
    )
