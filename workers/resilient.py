"""``ResilientTask``: the delivery semantics of docs/architecture.md, for every task using it.

Declare a task with its dependency and whether it is idempotent::

    @resilient_task("payments.charge", dependency="payments", idempotent=False)
    def charge(self, account, amount_cents, idempotency_key=None):
        return self.write("payments", client.post, "/effects/charge", {...},
                          idempotency_key=self.idempotency_key)

Each delivery then goes: arguments checked against the signature -> a mark taken in the
idempotency store -> the body, whose downstream calls run through the dependency's chain
(``self.read`` / ``self.write`` / ``self.optional``) -> the outcome decided here:

========================================  =========================  ======================
situation                                 idempotent (or keyed)      not idempotent
========================================  =========================  ======================
transient failure after calling           broker retry (countdown)   dead-letter
retries exhausted                         dead-letter (or queue      --
                                          for later if configured)
refused before calling (circuit open,     queue for later if         queue for later if
bulkhead full, state store down)          configured, else broker    configured, else
                                          retry; dead-letter after   broker retry; same
                                          the last attempt
permanent failure / bad arguments         dead-letter at once        dead-letter at once
redelivered after a worker died           runs again                 dead-letter: outcome
                                                                     unknown
duplicate of a finished task              acked, not run             acked, not run
========================================  =========================  ======================

Every message is acked late (after this decision), and a dead-letter copy is published with
confirms before that ack. Short waits between attempts happen in-process inside the
dependency's deadline (the chain's retry); longer ones go back to the broker as a countdown so
no worker slot sleeps for seconds. Both kinds of attempt count against one number, the
dependency's ``max_attempts``: a delivery's steps on the task's own dependency may make what
is left of it (:func:`resilience.retry.attempts_allowed`), and the next attempt's number rides
in the ``tidegate_attempt`` header.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded

from resilience.errors import PermanentError, Shed, TransientError
from resilience.fallback import Deferred
from workers import ack_writes
from workers import deadletter as dl
from workers import headers as h
from workers.errors import DeadLettered, InvalidPayload
from workers.execution import (
    CURRENT,
    Execution,
    current_execution,
    execution_of,
    job_status,
    job_status_due,
    lineage_of,
    statics_of,
)
from workers.idempotency import Mark, MarkState, Ride, StoreUnavailable
from workers.jobs import count_outcome
from workers.outcomes import (
    DEFERRED,
    PARK_S,
    REFUSAL_MAX_WAIT_S,
    cause_first,
    dead_letter,
    dead_status,
    park,
    report_deferred,
    retry_or_dead_letter,
)
from workers.poison import signature_of
from workers.policies import WorkerState, state_for
from workers.shedding import LOAD
from workers.steps import RETRYABLE, step

log = logging.getLogger("tidegate.worker")

# The task class and its delivery's flow live here; what a delivery is (workers.execution),
# the steps a body calls (workers.steps) and how a delivery ends when it does not succeed
# (workers.outcomes) in modules of their own, re-exported under the names users import.
__all__ = ["DEFERRED", "PARK_S", "REFUSAL_MAX_WAIT_S", "RETRYABLE", "Execution",
           "ResilientTask", "cause_first", "current_execution", "resilient_task"]

REPLAYED_FROM = "tidegate_replayed_from"  # set by `tidegate dlq replay` (workers.deadletter)


def _jsonable(value: Any) -> Any:
    """Results as JSON: fallback results (``Unavailable``, ``Deferred``) become tagged dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **dataclasses.asdict(value)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class ResilientTask(Task):
    """Base class; set ``dependency`` and ``idempotent`` (``resilient_task`` does)."""

    abstract = True
    dependency: str | None = None
    idempotent: bool = False
    acks_late = True  # every task: the outcome is decided before the ack
    reject_on_worker_lost = True  # a prefork child died: redeliver, the mark decides
    max_retries = None  # attempts are counted against the dependency's retry policy
    # a dead-lettered task ends by raising DeadLettered, so Celery (events, result backend,
    # Flower) records FAILURE with the DLQ reason; expected, so logged without a traceback
    throws = (DeadLettered,)

    # -- the steps a task body calls -----------------------------------------------------
    @property
    def execution(self) -> Execution:
        ex = CURRENT.get()
        if ex is None:
            raise RuntimeError(f"{self.name}: no delivery in progress (call it through Celery)")
        return ex

    @property
    def idempotency_key(self) -> str | None:
        """The key to send downstream: the caller's key (None when it gave none)."""
        return self.execution.idempotency_key

    def read(self, dependency: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read: on failure or refusal the dependency's cached/default fallback answers."""
        return step(self, dependency, fn, args, kwargs, kind="read")

    def write(self, dependency: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An effect: never replaced by a default; queued for later when configured."""
        return step(self, dependency, fn, args, kwargs, kind="write")

    def optional(self, dependency: str, fn: Callable[..., Any], *args: Any,
                 message: str | None = None, **kwargs: Any) -> Any:
        """A non-critical step: on failure it returns :class:`Unavailable` and the task goes on."""
        return step(self, dependency, fn, args, kwargs, kind="optional", message=message)

    # -- one delivery ------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        req = self.request
        if req.called_directly or req.is_eager:
            ex = self._execution(args, kwargs)
            token = CURRENT.set(ex)
            try:
                return self.run(*args, **kwargs)
            finally:
                CURRENT.reset(token)
        ex = self._execution(args, kwargs)
        token = CURRENT.set(ex)
        state = state_for(self.app)
        try:
            with LOAD.running():
                return self._deliver(state, ex, args, kwargs)
        finally:
            CURRENT.reset(token)
            if ex.leased:
                state.idempotency.let_go(self.name, ex.mark)

    def _execution(self, args: tuple, kwargs: dict) -> Execution:
        """This delivery, read from the request (``workers.execution``)."""
        return execution_of(self, args, kwargs)

    def _deliver(self, state: WorkerState, ex: Execution, args: tuple, kwargs: dict) -> Any:
        try:
            signature_of(self).bind(*args, **kwargs)
        except TypeError as exc:
            return dead_letter(self, state, ex, dl.INVALID_ARGUMENTS,
                               InvalidPayload(f"{self.name}: {exc}"), mark=False)
        deadline = ex.headers.get(h.DEADLINE)
        if deadline is not None and float(deadline) < time.time():
            return dead_letter(self, state, ex, "deadline_expired", TransientError(
                f"the enqueuer's deadline passed {time.time() - float(deadline):.1f}s before "
                "a worker took the task"), mark=False)
        shedder = state.shedders.get(ex.queue)
        if shedder is not None:  # overloaded: LOW first, never CRITICAL (workers.shedding)
            try:
                shedder.admit(ex.priority, ex.headers.get(h.ENQUEUED_AT),
                              getattr(self.request, "eta", None), deadline)
            except Shed as exc:
                return dead_letter(self, state, ex, dl.SHED, exc, mark=False)
        # "running", written with the mark or the lease where they share a line: one socket
        # write (or none beyond the mark's round trip) instead of one more per task
        running_fields = {"worker": ex.worker, "attempt": ex.attempt,
                          "replayed_from": h.read(self.request, REPLAYED_FROM)}
        running = job_status_due(state, ex, "running", **running_fields)
        running_sent = False
        if ex.reads_mark:
            try:
                mark = state.idempotency.begin(self.name, ex.mark, worker=ex.worker,
                                               status=running)
            except StoreUnavailable as exc:
                return retry_or_dead_letter(self, state, ex, exc, nothing_called=True)
            running_sent = mark.status_sent
        else:
            mark = Mark(ex.mark, MarkState.NEW)  # a round trip saved: nothing can be there
            try:  # no mark, but a lease, so a redelivery can see this run is in flight
                running_sent = state.idempotency.hold(
                    self.name, ex.mark, also=(running,) if running else ()) and bool(running)
                ex.leased = True
            except StoreUnavailable as exc:
                log.warning("%s[%s]: run lease not taken: %s", ex.task, ex.task_id, exc)
        ex.leased = ex.leased or mark.leased
        if mark.live:
            return park(self, ex, mark)
        if mark.state is MarkState.DONE:
            log.info("%s[%s]: duplicate of a finished task (key %s); acked, not run", ex.task,
                     ex.task_id, ex.mark)
            return mark.result
        if mark.state is MarkState.DEAD:
            log.info("%s[%s]: duplicate of dead-lettered record %s; acked, not run", ex.task,
                     ex.task_id, mark.result)
            dead_status(self, state, ex, mark.result)
            # still a failure to Celery: a SUCCESS event would outrank the first FAILURE
            raise DeadLettered(f"already dead-lettered (record {mark.result}); this duplicate "
                               "was acked, not run", "already_dead_lettered", mark.result)
        if mark.state is MarkState.STARTED:
            if not ex.idempotent:
                ex.effect_attempted = True
                return dead_letter(self, state, ex, dl.OUTCOME_UNKNOWN, RuntimeError(
                    f"a previous delivery started on {mark.worker} at {mark.at} and never "
                    "finished (worker lost?): not run again, the effect may have happened"))
            ex.reached_before = True  # that run may have reached the dependency
            log.warning("%s[%s]: redelivered after an unfinished run on %s; running again "
                        "(idempotent)", ex.task, ex.task_id, mark.worker)
        elif ex.redelivered and ex.idempotent:
            ex.reached_before = True  # the unfinished delivery may have reached it
            log.warning("%s[%s]: redelivered after an unfinished delivery; running again "
                        "(idempotent)", ex.task, ex.task_id)
        if not running_sent:
            job_status(state, ex, "running", **running_fields)
        try:
            with lineage_of(ex):
                result = self.run(*args, **kwargs)
        except Retry:
            raise
        except SoftTimeLimitExceeded as exc:
            reason = dl.OUTCOME_UNKNOWN if (ex.effect_attempted and not ex.idempotent) \
                else dl.TIME_LIMIT
            return dead_letter(self, state, ex, reason, exc)
        except PermanentError as exc:
            return dead_letter(self, state, ex, dl.PERMANENT, exc)
        except RETRYABLE as exc:
            return retry_or_dead_letter(self, state, ex, exc,
                                        nothing_called=not ex.effect_attempted)
        except Exception as exc:  # a bug in the task: keep the message, with its traceback
            return dead_letter(self, state, ex, dl.BUG, exc)
        if isinstance(result, Deferred):
            with contextlib.suppress(StoreUnavailable):
                state.idempotency.release(self.name, ex.mark)
            log.warning("%s[%s]: %s unavailable; deferred as %s (queue for later)", ex.task,
                        ex.task_id, result.dependency, result.id)
            job_status(state, ex, "deferred", deferred_id=result.id, dependency=result.dependency)
            if state.jobs is not None:  # the replayer finds this job from the SQS entry's id
                state.jobs.write(result.id, "deferred", job=ex.task_id, task=ex.task,
                                 queue=ex.queue, dependency=result.dependency)
            report_deferred(self, ex, result)
            raise Ignore()  # acked; Celery sends no task-succeeded, so DEFERRED stands
        result = _jsonable(result)
        succeeded = {"worker": ex.worker, "fallbacks": ex.fallbacks or None}
        done = job_status_due(state, ex, "succeeded", **succeeded)
        sent = False
        try:  # the done mark, the lease's removal and "succeeded" in one socket write, with
            # the message's ack where it can (workers.ack_writes)
            sent = state.idempotency.finish(self.name, ex.mark, result,
                                            also=(done,) if done else (),
                                            ride=_ack_ride(self, ex)) and bool(done)
        except StoreUnavailable as exc:
            # The effect happened; only the mark is stale ("started"). A duplicate then runs
            # again if idempotent, or is dead-lettered as outcome unknown: never repeated.
            log.warning("%s[%s]: done, but the done mark was not stored: %s", ex.task,
                        ex.task_id, exc)
        if sent:
            count_outcome(ex.queue, "succeeded")
        else:
            job_status(state, ex, "succeeded", **succeeded)
        if ex.fallbacks:
            log.warning("%s[%s]: done degraded (fallbacks: %s)", ex.task, ex.task_id,
                        ", ".join(ex.fallbacks))
        return result



def _ack_ride(task: ResilientTask, ex: Execution) -> Ride | None:
    """The done mark's ride in the message's ack, where this worker acks it (see
    ``workers.ack_writes``); None: the mark goes on its own."""
    dbs = statics_of(task).ack_dbs
    if dbs is None or not ack_writes.rides_here():
        return None
    return lambda commands, send: ack_writes.ride_with_ack(
        ex.task_id, ack_writes.Rider(commands, send, dbs))


def resilient_task(name: str, *, dependency: str, idempotent: bool,
                   **options: Any) -> Callable[[Callable[..., Any]], ResilientTask]:
    """Declare a task: its name (which routes it to its queue), dependency and idempotency."""
    if not isinstance(idempotent, bool):
        raise TypeError("idempotent must be True or False")

    def decorate(fn: Callable[..., Any]) -> ResilientTask:
        return shared_task(name=name, bind=True, base=ResilientTask, dependency=dependency,
                           idempotent=idempotent, **options)(fn)

    return decorate

