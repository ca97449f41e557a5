"""How a delivery ends when it does not simply succeed: parked, retried later, dead-lettered.

The dead-letter/retry decision of docs/architecture.md's delivery table
(:func:`retry_or_dead_letter`), the broker retry with its countdown (:func:`retry_later`),
the dead-letter copy published before the ack (:func:`dead_letter`), a redelivery parked
behind a run still in flight (:func:`park`), and what Celery's monitors and the job status
are told on the way. Each function takes the task whose delivery it ends (``self`` in
``workers.resilient``) and raises what Celery needs to see (``Retry``, ``Reject``,
``DeadLettered``).
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any, NoReturn

from celery.app.task import get_actual_ignore_result
from celery.exceptions import Reject, Retry

from resilience.errors import RejectedError
from resilience.fallback import Deferred, Graceful
from resilience.retry import backoff_delay
from workers import deadletter as dl
from workers import headers as h
from workers.brokers import broker_for
from workers.errors import DeadLettered
from workers.execution import Execution, job_status
from workers.idempotency import Mark, StoreUnavailable
from workers.installation import installation
from workers.policies import WorkerState

if TYPE_CHECKING:
    from workers.resilient import ResilientTask

log = logging.getLogger("tidegate.worker")

__all__ = ["DEFERRED", "PARK_S", "REFUSAL_MAX_WAIT_S", "cause_first", "dead_letter",
           "dead_status", "park", "report_deferred", "retry_later", "retry_or_dead_letter",
           "told"]

# Celery's view of a task queued for later: a custom state, in a "task-deferred" event (Flower
# and celery.events.State show it as DEFERRED) and in the result backend. Never SUCCESS.
DEFERRED = "DEFERRED"
REFUSAL_MAX_WAIT_S = 120.0  # longest countdown for a task refused before any call
PARK_S = 1.0  # a redelivery parked behind a run in flight comes back after 1-1.5 s


def park(task: ResilientTask, ex: Execution, mark: Mark) -> Any:
    """An earlier run of this mark is in flight (its lease is live): publish this delivery
    again with a short countdown and ack it, so it runs, or is acked as a duplicate, once
    that run's outcome is in the mark. Not an attempt: the retry count stays as it was."""
    delay = PARK_S * random.uniform(1.0, 1.5)
    log.warning("%s[%s]: redelivered while an earlier run (%s) is still in flight; parked "
                "for %.1fs, not run alongside it", ex.task, ex.task_id,
                mark.worker or "no mark yet", delay)
    req = task.request
    headers = {**ex.headers, h.ATTEMPT: ex.attempt, h.FIRST_SEEN: ex.first_seen}
    parked = task.signature_from_request(req, countdown=delay, retries=req.retries or 0,
                                         headers=headers)
    try:
        parked.apply_async()
    except Exception as exc:  # not published: the broker has it until we ack
        raise Reject(f"not parked: {exc}", requeue=True) from exc
    raise Retry(f"parked behind an earlier run in flight ({ex.mark})", when=delay,
                sig=parked)


def retry_or_dead_letter(task: ResilientTask, state: WorkerState, ex: Execution,
                         exc: BaseException, *, nothing_called: bool) -> Any:
    """The delivery table's decision for a retryable failure: another attempt through the
    broker, or the dead-letter queue with the reason."""
    if nothing_called:
        # Refused before any effect (circuit open, bulkhead full, a read failed, the
        # store is down): trying again later is safe even for non-idempotent work.
        if not ex.last_attempt:
            return retry_later(task, state, ex, exc)
        return dead_letter(task, state, ex, dl.REJECTIONS_EXHAUSTED
                           if isinstance(exc, RejectedError | StoreUnavailable)
                           else dl.RETRIES_EXHAUSTED, exc)
    if not ex.idempotent:
        return dead_letter(task, state, ex, dl.TRANSIENT_NOT_IDEMPOTENT, exc)
    if not ex.last_attempt:
        return retry_later(task, state, ex, exc)
    return dead_letter(task, state, ex, dl.RETRIES_EXHAUSTED, exc)


def retry_later(task: ResilientTask, state: WorkerState, ex: Execution,
                exc: BaseException) -> Any:
    """Another attempt through the broker, after the backoff of the job's next attempt (or
    what the refusal said to wait), carrying the attempt number and whether a write reached
    the dependency."""
    config = state.configs[task.dependency].retry_config if task.dependency in state.configs \
        else None
    following = ex.attempts_used + 1  # in-call attempts included: the queue scale's index
    delay = backoff_delay(following, config)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        # Refused (circuit open, rate limited): trying before it may reopen is a wasted
        # attempt, so wait it out (plus up to 20% jitter), up to REFUSAL_MAX_WAIT_S.
        spread = float(retry_after) * (1 + random.uniform(0, 0.2))
        delay = max(delay, min(spread, REFUSAL_MAX_WAIT_S))
    headers = {**ex.headers, h.ATTEMPT: following, h.FIRST_SEEN: ex.first_seen}
    if ex.effect_attempted or ex.reached_before:
        headers[h.REACHED] = True
    # The next attempt is a planned one, not a redelivery: it must not find "started".
    # (Only idempotent work, or work that reached no dependency, gets here.)
    with contextlib.suppress(StoreUnavailable):
        state.idempotency.release(task.name, ex.mark)
    log.warning("%s[%s]: attempt %d/%d failed: %s; retry in %.2fs through the broker",
                ex.task, ex.task_id, ex.attempts_used, ex.max_attempts, cause_first(exc),
                delay)
    job_status(state, ex, "retrying", attempt=following, retry_in_s=round(delay, 3),
               error=f"{type(exc).__name__}: {exc}"[:500])
    try:
        raise task.retry(countdown=delay, headers=headers, exc=exc)
    except Reject as rejected:
        # Celery rejects WITHOUT requeue when the retry cannot be published (the broker
        # is down or failing over); on Redis that acks the message away once the broker
        # answers again: lost (found by the Sentinel drill). Put it back instead.
        if broker_for(installation(task.app).settings).dead_letters_natively:
            raise  # RabbitMQ dead-letters a rejected message natively
        log.error("%s[%s]: retry not published (%s); requeueing", ex.task, ex.task_id,
                  rejected.reason)
        raise Reject(rejected.reason, requeue=True) from exc


def dead_status(task: ResilientTask, state: WorkerState, ex: Execution, record: Any) -> None:
    """A duplicate of a dead-lettered job: the delivery that dead-lettered it may have died
    (SIGKILL) between the DLQ record and the job status, leaving "running" for good. Write
    "dead_lettered" then; what that delivery reached is not known here, so a graceful
    fallback's answer is "unknown", never "not charged". One read, on this rare path."""
    if state.jobs is None:
        return
    try:
        current = state.jobs.read(ex.task_id, follow=False)
    except Exception:  # the status is best effort; the duplicate is acked either way
        return
    if current is not None and current.get("state") in ("dead_lettered", "replayed"):
        return
    ex.reached_before = True
    job_status(state, ex, "dead_lettered", record=record,
               dlq=installation(task.app).topology.dead_letter_queue(ex.queue),
               error=f"dead-lettered by an earlier delivery (record {record}); this duplicate "
                     "was acked, not run", **told(task, state, ex))


def told(task: ResilientTask, state: WorkerState, ex: Execution) -> dict[str, str]:
    """What a job that failed tells its user, where its dependency's fallback is
    ``graceful``: ``message`` ("you have not been charged") only when no delivery's write
    reached the dependency, else ``message_unknown``; with ``outcome`` saying which."""
    config = state.configs.get(task.dependency or "")
    spec = config.fallback if config is not None else None
    if spec is None or spec.kind != "graceful":
        return {}
    outcome, message = Graceful(spec.message, spec.unknown_message).answer(
        task.dependency or "", reached=ex.effect_attempted or ex.reached_before)
    return {"outcome": outcome, "message": message}


def report_deferred(task: ResilientTask, ex: Execution, deferred: Deferred) -> None:
    """Tell Celery's monitors (a ``task-deferred`` event) and the result backend (state
    DEFERRED), where they are on. Best effort: the request is safely stored already."""
    meta = {"deferred_id": deferred.id, "dependency": deferred.dependency}
    try:
        if task.app.conf.worker_send_task_events:
            task.send_event("task-deferred", retry=False, **meta)
        # stored where Celery would store the task's result (its own rule, per message)
        if task.app.conf.result_backend and not get_actual_ignore_result(task, task.request):
            task.update_state(state=DEFERRED, meta=meta)
    except Exception as exc:  # a monitor or backend down must not fail the delivery
        log.warning("%s[%s]: deferral not reported to Celery: %s", ex.task, ex.task_id, exc)


def dead_letter(task: ResilientTask, state: WorkerState, ex: Execution, reason: str,
                exc: BaseException | None, *, mark: bool = True) -> NoReturn:
    """Publish the delivery's dead-letter record (with confirms) and mark the job dead, so
    the message can be acked; if the record is not stored, reject the message instead."""
    record = dl.DeadLetter(
        reason=reason, queue=ex.queue, task=ex.task, task_id=ex.task_id,
        args=list(ex.args), kwargs=dict(ex.kwargs),
        headers={**ex.headers, h.ATTEMPT: ex.attempts_used, h.FIRST_SEEN: ex.first_seen,
                 **({h.REACHED: True} if ex.effect_attempted or ex.reached_before else {})},
        idempotency_key=ex.idempotency_key, idempotent=ex.idempotent,
        attempts=ex.attempts_used,
        worker=ex.worker, first_seen=ex.first_seen,
    ).with_error(exc)
    try:
        dl.DeadLetters(task.app).publish(record)
    except dl.DeadLetterError as err:
        # Not stored: the message must not be acked. RabbitMQ's native dead-lettering
        # takes a rejected message; elsewhere it goes back to the queue.
        requeue = not broker_for(installation(task.app).settings).dead_letters_natively
        log.error("%s[%s]: %s; rejecting (requeue=%s)", ex.task, ex.task_id, err, requeue)
        job_status(state, ex, "failed", error=str(err)[:500], **told(task, state, ex))
        raise Reject(str(err), requeue=requeue) from err
    if mark:
        try:
            state.idempotency.dead(task.name, ex.mark, record.id)
        except StoreUnavailable:
            log.warning("%s[%s]: could not mark as dead-lettered", ex.task, ex.task_id)
    # a shed is counted and logged once per spell (workers.shedding), not once per job
    log.log(logging.DEBUG if reason == dl.SHED else logging.ERROR,
            "%s[%s]: dead-lettered to %s as %s (record %s): %s: %s", ex.task, ex.task_id,
            installation(task.app).topology.dead_letter_queue(ex.queue), reason, record.id,
            record.exception_type, record.exception_message)
    what = f"{record.exception_type}: {record.exception_message}" if exc else "-"
    job_status(state, ex, "dead_lettered", reason=reason, record=record.id, error=what[:500],
               dlq=installation(task.app).topology.dead_letter_queue(ex.queue),
               **told(task, state, ex))
    raise DeadLettered(f"{reason}: {what[:500]} (dead-lettered to "
                       f"{installation(task.app).topology.dead_letter_queue(ex.queue)}, "
                       f"record {record.id})", reason, record.id)


def cause_first(exc: BaseException) -> str:
    """``exc`` for a log line, the root cause first: a retry that ran out of deadline or budget
    reads "HTTPStatusError: 503 ... (DeadlineExceeded: no room for attempt 3)", not the
    other way round with the cause at the end."""
    root = getattr(exc, "last_exception", None) or exc.__cause__
    if root is None or root is exc:
        return f"{type(exc).__name__}: {exc}"
    wrapper = str(exc).split("; last error:")[0]
    return f"{type(root).__name__}: {root} ({type(exc).__name__}: {wrapper})"
