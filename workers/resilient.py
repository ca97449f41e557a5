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
import contextvars
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

from celery import Task, shared_task
from celery.app.task import get_actual_ignore_result
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from resilience.errors import InProgress, PermanentError, RejectedError, Shed, TransientError
from resilience.fallback import (
    CallContext,
    DeferralError,
    Deferred,
    Graceful,
    NoFallback,
    QueueForLater,
    replay_lineage,
)
from resilience.retry import attempts_allowed, backoff_delay
from resilience.shedding import Priority
from workers import deadletter as dl
from workers import headers as h
from workers.brokers import BrokerAdapter, broker_for
from workers.errors import DeadLettered, InvalidPayload
from workers.idempotency import Mark, MarkState, StoreUnavailable, mark_key
from workers.installation import installation
from workers.jobs import count_outcome
from workers.poison import signature_of
from workers.policies import WorkerState, state_for
from workers.shedding import LOAD

log = logging.getLogger("tidegate.worker")

__all__ = ["DEFERRED", "Execution", "ResilientTask", "current_execution", "resilient_task"]

# Celery's view of a task queued for later: a custom state, in a "task-deferred" event (Flower
# and celery.events.State show it as DEFERRED) and in the result backend. Never SUCCESS.
DEFERRED = "DEFERRED"
RETRYABLE = (TransientError, OSError, TimeoutError)
REPLAYED_FROM = "tidegate_replayed_from"  # set by `tidegate dlq replay` (workers.deadletter)
REFUSAL_MAX_WAIT_S = 120.0  # longest countdown for a task refused before any call
PARK_S = 1.0  # a redelivery parked behind a run in flight comes back after 1-1.5 s
_current: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
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


class _Static(NamedTuple):
    """What every delivery of one task shares (``ResilientTask._static``)."""

    home_queue: str  # where the policy file routes the task
    work_queues: frozenset[str]
    max_attempts: int
    honours_fresh_ids: bool  # the broker flags redeliveries, so h.FRESH_ID can be trusted
    broker: BrokerAdapter  # how to read a message's broker priority



def current_execution() -> Execution | None:
    return _current.get()


def _lineage_of(ex: Execution) -> contextlib.AbstractContextManager[None]:
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
        ex = _current.get()
        if ex is None:
            raise RuntimeError(f"{self.name}: no delivery in progress (call it through Celery)")
        return ex

    @property
    def idempotency_key(self) -> str | None:
        """The key to send downstream: the caller's key (None when it gave none)."""
        return self.execution.idempotency_key

    def read(self, dependency: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read: on failure or refusal the dependency's cached/default fallback answers."""
        return self._step(dependency, fn, args, kwargs, kind="read")

    def write(self, dependency: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An effect: never replaced by a default; queued for later when configured."""
        return self._step(dependency, fn, args, kwargs, kind="write")

    def optional(self, dependency: str, fn: Callable[..., Any], *args: Any,
                 message: str | None = None, **kwargs: Any) -> Any:
        """A non-critical step: on failure it returns :class:`Unavailable` and the task goes on."""
        return self._step(dependency, fn, args, kwargs, kind="optional", message=message)

    def _step(self, dependency: str, fn: Callable[..., Any], args: tuple, kwargs: dict, *,
              kind: str, message: str | None = None) -> Any:
        ex = self.execution
        state = state_for(self.app)
        policy = state.policy(dependency)
        fallback = state.fallback_for(dependency)
        name = f"{dependency}:{getattr(fn, '__name__', 'call')}"

        def invoked() -> Any:
            attempted = ex.effect_attempted
            if kind != "read":
                ex.effect_attempted = True
            try:
                return fn(*args, **kwargs)
            except InProgress:
                # The provider refused this request: an earlier one with the same key is still
                # running there. This one applied nothing; a later try with the same key gets
                # the first one's outcome (never a second effect).
                ex.effect_attempted = attempted
                raise

        invoked.name = name  # type: ignore[attr-defined]  (the chain labels calls by it)
        ctx = CallContext(dependency, name, args, kwargs, ex.idempotency_key, int(ex.priority))
        # the task's own dependency: its in-call attempts spend the job's attempts
        share = attempts_allowed(ex.attempts_left) if dependency == self.dependency \
            else contextlib.nullcontext()
        try:
            with share as allowance:
                try:
                    result = policy.call(invoked, idempotency_key=ex.idempotency_key,
                                         priority=ex.priority)
                finally:
                    if allowance is not None:
                        ex.calls = max(ex.calls, allowance.made)
        except PermanentError:
            raise
        except RETRYABLE as exc:
            return self._fall_back(ex, dependency, kind, fallback, ctx, exc, message)
        if kind == "read" and fallback is not None:
            fallback.on_success(ctx, result)
        return result

    def _fall_back(self, ex: Execution, dependency: str, kind: str, fallback: Any,
                   ctx: CallContext, exc: BaseException, message: str | None) -> Any:
        if kind == "read" and fallback is not None and fallback.kind in ("cached", "default"):
            try:
                value = fallback.recover(ctx, exc)
            except NoFallback:
                raise exc from None
            ex.fallbacks.append(f"{dependency}:{fallback.kind}")
            log.warning("%s[%s]: %s unavailable (%s); served the %s fallback", ex.task,
                        ex.task_id, dependency, exc, fallback.kind)
            return value
        if kind == "optional":
            ex.fallbacks.append(f"{dependency}:graceful")
            log.warning("%s[%s]: optional step on %s failed gracefully: %s", ex.task, ex.task_id,
                        dependency, exc)
            # the task's own words for a step it can do without, whatever the outcome
            return Graceful(message, message).recover(ctx, exc)
        refused = isinstance(exc, RejectedError)
        if kind == "write" and isinstance(fallback, QueueForLater) and (
            refused or (ex.idempotent and ex.last_attempt)
        ):
            whole = CallContext(dependency, ex.task, tuple(ex.args), dict(ex.kwargs),
                                ex.idempotency_key or ex.task_id, int(ex.priority))
            try:
                deferred = fallback.recover(whole, exc)
            except DeferralError as err:
                log.error("%s[%s]: queue-for-later failed (%s); normal failure path", ex.task,
                          ex.task_id, err)
                raise exc from None
            except NoFallback as err:  # deferred too often already: retry, then dead-letter
                log.warning("%s[%s]: not queued for later: %s; normal failure path", ex.task,
                            ex.task_id, err)
                raise exc from None
            ex.fallbacks.append(f"{dependency}:queue")
            return deferred
        raise exc

    # -- one delivery ------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        req = self.request
        if req.called_directly or req.is_eager:
            ex = self._execution(args, kwargs)
            token = _current.set(ex)
            try:
                return self.run(*args, **kwargs)
            finally:
                _current.reset(token)
        ex = self._execution(args, kwargs)
        token = _current.set(ex)
        state = state_for(self.app)
        try:
            with LOAD.running():
                return self._deliver(state, ex, args, kwargs)
        finally:
            _current.reset(token)
            if ex.leased:
                state.idempotency.let_go(self.name, ex.mark)

    def _static(self) -> _Static:
        """What every delivery of this task shares: worked out on the first one."""
        static: _Static | None = self.__dict__.get("_tidegate_static")
        if static is None:
            config = state_for(self.app).configs.get(self.dependency or "")
            installed = installation(self.app)
            topology = installed.topology
            broker = broker_for(installed.settings)
            static = self._tidegate_static = _Static(
                home_queue=topology.queue_for_task(self.name),
                work_queues=frozenset(topology.work_queues),
                max_attempts=config.retry_config.max_attempts if config else 1,
                # only where the broker flags redeliveries (SQS does not): a repeat looks fresh
                honours_fresh_ids=broker.flags_redelivery,
                broker=broker,
            )
        return static

    def _execution(self, args: tuple, kwargs: dict) -> Execution:
        req = self.request
        static = self._static()
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
            task=self.name, task_id=req.id or "", queue=queue, args=tuple(args),
            kwargs=dict(kwargs), headers=tidegate, idempotency_key=key,
            idempotent=bool(self.idempotent or key), attempt=_attempt_of(tidegate, req),
            max_attempts=static.max_attempts, priority=priority,
            first_seen=float(tidegate.get(h.FIRST_SEEN) or tidegate.get(h.ENQUEUED_AT)
                             or time.time()),
            worker=req.hostname or "-", redelivered=redelivered,
            fresh=(not redelivered and static.honours_fresh_ids
                   and bool(h.read(req, h.FRESH_ID))),
            reached_before=bool(tidegate.get(h.REACHED)),
        )

    def _deliver(self, state: WorkerState, ex: Execution, args: tuple, kwargs: dict) -> Any:
        try:
            signature_of(self).bind(*args, **kwargs)
        except TypeError as exc:
            return self._dead_letter(state, ex, dl.INVALID_ARGUMENTS,
                                     InvalidPayload(f"{self.name}: {exc}"), mark=False)
        deadline = ex.headers.get(h.DEADLINE)
        if deadline is not None and float(deadline) < time.time():
            return self._dead_letter(state, ex, "deadline_expired", TransientError(
                f"the enqueuer's deadline passed {time.time() - float(deadline):.1f}s before "
                "a worker took the task"), mark=False)
        shedder = state.shedders.get(ex.queue)
        if shedder is not None:  # overloaded: LOW first, never CRITICAL (workers.shedding)
            try:
                shedder.admit(ex.priority, ex.headers.get(h.ENQUEUED_AT),
                              getattr(self.request, "eta", None), deadline)
            except Shed as exc:
                return self._dead_letter(state, ex, dl.SHED, exc, mark=False)
        # "running", written with the mark or the lease where they share a line: one socket
        # write (or none beyond the mark's round trip) instead of one more per task
        running_fields = {"worker": ex.worker, "attempt": ex.attempt,
                          "replayed_from": h.read(self.request, REPLAYED_FROM)}
        running = _job_due(state, ex, "running", **running_fields)
        running_sent = False
        if ex.reads_mark:
            try:
                mark = state.idempotency.begin(self.name, ex.mark, worker=ex.worker,
                                               status=running)
            except StoreUnavailable as exc:
                return self._retry_or_dead_letter(state, ex, exc, nothing_called=True)
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
            return self._park(ex, mark)
        if mark.state is MarkState.DONE:
            log.info("%s[%s]: duplicate of a finished task (key %s); acked, not run", ex.task,
                     ex.task_id, ex.mark)
            return mark.result
        if mark.state is MarkState.DEAD:
            log.info("%s[%s]: duplicate of dead-lettered record %s; acked, not run", ex.task,
                     ex.task_id, mark.result)
            self._dead_status(state, ex, mark.result)
            # still a failure to Celery: a SUCCESS event would outrank the first FAILURE
            raise DeadLettered(f"already dead-lettered (record {mark.result}); this duplicate "
                               "was acked, not run", "already_dead_lettered", mark.result)
        if mark.state is MarkState.STARTED:
            if not ex.idempotent:
                ex.effect_attempted = True
                return self._dead_letter(state, ex, dl.OUTCOME_UNKNOWN, RuntimeError(
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
            _job(state, ex, "running", **running_fields)
        try:
            with _lineage_of(ex):
                result = self.run(*args, **kwargs)
        except Retry:
            raise
        except SoftTimeLimitExceeded as exc:
            reason = dl.OUTCOME_UNKNOWN if (ex.effect_attempted and not ex.idempotent) \
                else dl.TIME_LIMIT
            return self._dead_letter(state, ex, reason, exc)
        except PermanentError as exc:
            return self._dead_letter(state, ex, dl.PERMANENT, exc)
        except RETRYABLE as exc:
            return self._retry_or_dead_letter(state, ex, exc,
                                              nothing_called=not ex.effect_attempted)
        except Exception as exc:  # a bug in the task: keep the message, with its traceback
            return self._dead_letter(state, ex, dl.BUG, exc)
        if isinstance(result, Deferred):
            with contextlib.suppress(StoreUnavailable):
                state.idempotency.release(self.name, ex.mark)
            log.warning("%s[%s]: %s unavailable; deferred as %s (queue for later)", ex.task,
                        ex.task_id, result.dependency, result.id)
            _job(state, ex, "deferred", deferred_id=result.id, dependency=result.dependency)
            if state.jobs is not None:  # the replayer finds this job from the SQS entry's id
                state.jobs.write(result.id, "deferred", job=ex.task_id, task=ex.task,
                                 queue=ex.queue, dependency=result.dependency)
            self._report_deferred(ex, result)
            raise Ignore()  # acked; Celery sends no task-succeeded, so DEFERRED stands
        result = _jsonable(result)
        succeeded = {"worker": ex.worker, "fallbacks": ex.fallbacks or None}
        done = _job_due(state, ex, "succeeded", **succeeded)
        sent = False
        try:  # the done mark, the lease's removal and "succeeded" in one socket write
            sent = state.idempotency.finish(self.name, ex.mark, result,
                                            also=(done,) if done else ()) and bool(done)
        except StoreUnavailable as exc:
            # The effect happened; only the mark is stale ("started"). A duplicate then runs
            # again if idempotent, or is dead-lettered as outcome unknown: never repeated.
            log.warning("%s[%s]: done, but the done mark was not stored: %s", ex.task,
                        ex.task_id, exc)
        if sent:
            count_outcome(ex.queue, "succeeded")
        else:
            _job(state, ex, "succeeded", **succeeded)
        if ex.fallbacks:
            log.warning("%s[%s]: done degraded (fallbacks: %s)", ex.task, ex.task_id,
                        ", ".join(ex.fallbacks))
        return result

    # -- outcomes ------------------------------------------------------------------------
    def _park(self, ex: Execution, mark: Mark) -> Any:
        """An earlier run of this mark is in flight (its lease is live): publish this delivery
        again with a short countdown and ack it, so it runs, or is acked as a duplicate, once
        that run's outcome is in the mark. Not an attempt: the retry count stays as it was."""
        delay = PARK_S * random.uniform(1.0, 1.5)
        log.warning("%s[%s]: redelivered while an earlier run (%s) is still in flight; parked "
                    "for %.1fs, not run alongside it", ex.task, ex.task_id,
                    mark.worker or "no mark yet", delay)
        req = self.request
        headers = {**ex.headers, h.ATTEMPT: ex.attempt, h.FIRST_SEEN: ex.first_seen}
        parked = self.signature_from_request(req, countdown=delay, retries=req.retries or 0,
                                             headers=headers)
        try:
            parked.apply_async()
        except Exception as exc:  # not published: the broker has it until we ack
            raise Reject(f"not parked: {exc}", requeue=True) from exc
        raise Retry(f"parked behind an earlier run in flight ({ex.mark})", when=delay,
                    sig=parked)

    def _retry_or_dead_letter(self, state: WorkerState, ex: Execution, exc: BaseException, *,
                              nothing_called: bool) -> Any:
        if nothing_called:
            # Refused before any effect (circuit open, bulkhead full, a read failed, the
            # store is down): trying again later is safe even for non-idempotent work.
            if not ex.last_attempt:
                return self._retry_later(state, ex, exc)
            return self._dead_letter(state, ex, dl.REJECTIONS_EXHAUSTED
                                     if isinstance(exc, RejectedError | StoreUnavailable)
                                     else dl.RETRIES_EXHAUSTED, exc)
        if not ex.idempotent:
            return self._dead_letter(state, ex, dl.TRANSIENT_NOT_IDEMPOTENT, exc)
        if not ex.last_attempt:
            return self._retry_later(state, ex, exc)
        return self._dead_letter(state, ex, dl.RETRIES_EXHAUSTED, exc)

    def _retry_later(self, state: WorkerState, ex: Execution, exc: BaseException) -> Any:
        config = state.configs[self.dependency].retry_config if self.dependency in state.configs \
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
            state.idempotency.release(self.name, ex.mark)
        log.warning("%s[%s]: attempt %d/%d failed: %s; retry in %.2fs through the broker",
                    ex.task, ex.task_id, ex.attempts_used, ex.max_attempts, cause_first(exc),
                    delay)
        _job(state, ex, "retrying", attempt=following, retry_in_s=round(delay, 3),
             error=f"{type(exc).__name__}: {exc}"[:500])
        try:
            raise self.retry(countdown=delay, headers=headers, exc=exc)
        except Reject as rejected:
            # Celery rejects WITHOUT requeue when the retry cannot be published (the broker
            # is down or failing over); on Redis that acks the message away once the broker
            # answers again: lost (found by the Sentinel drill). Put it back instead.
            if broker_for(installation(self.app).settings).dead_letters_natively:
                raise  # RabbitMQ dead-letters a rejected message natively
            log.error("%s[%s]: retry not published (%s); requeueing", ex.task, ex.task_id,
                      rejected.reason)
            raise Reject(rejected.reason, requeue=True) from exc

    def _dead_status(self, state: WorkerState, ex: Execution, record: Any) -> None:
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
        _job(state, ex, "dead_lettered", record=record,
             dlq=installation(self.app).topology.dead_letter_queue(ex.queue),
             error=f"dead-lettered by an earlier delivery (record {record}); this duplicate "
                   "was acked, not run", **self._told(state, ex))

    def _told(self, state: WorkerState, ex: Execution) -> dict[str, str]:
        """What a job that failed tells its user, where its dependency's fallback is
        ``graceful``: ``message`` ("you have not been charged") only when no delivery's write
        reached the dependency, else ``message_unknown``; with ``outcome`` saying which."""
        config = state.configs.get(self.dependency or "")
        spec = config.fallback if config is not None else None
        if spec is None or spec.kind != "graceful":
            return {}
        outcome, message = Graceful(spec.message, spec.unknown_message).answer(
            self.dependency or "", reached=ex.effect_attempted or ex.reached_before)
        return {"outcome": outcome, "message": message}

    def _report_deferred(self, ex: Execution, deferred: Deferred) -> None:
        """Tell Celery's monitors (a ``task-deferred`` event) and the result backend (state
        DEFERRED), where they are on. Best effort: the request is safely stored already."""
        meta = {"deferred_id": deferred.id, "dependency": deferred.dependency}
        try:
            if self.app.conf.worker_send_task_events:
                self.send_event("task-deferred", retry=False, **meta)
            # stored where Celery would store the task's result (its own rule, per message)
            if self.app.conf.result_backend and not get_actual_ignore_result(self, self.request):
                self.update_state(state=DEFERRED, meta=meta)
        except Exception as exc:  # a monitor or backend down must not fail the delivery
            log.warning("%s[%s]: deferral not reported to Celery: %s", ex.task, ex.task_id, exc)

    def _dead_letter(self, state: WorkerState, ex: Execution, reason: str,
                     exc: BaseException | None, *, mark: bool = True) -> NoReturn:
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
            dl.DeadLetters(self.app).publish(record)
        except dl.DeadLetterError as err:
            # Not stored: the message must not be acked. RabbitMQ's native dead-lettering
            # takes a rejected message; elsewhere it goes back to the queue.
            requeue = not broker_for(installation(self.app).settings).dead_letters_natively
            log.error("%s[%s]: %s; rejecting (requeue=%s)", ex.task, ex.task_id, err, requeue)
            _job(state, ex, "failed", error=str(err)[:500], **self._told(state, ex))
            raise Reject(str(err), requeue=requeue) from err
        if mark:
            try:
                state.idempotency.dead(self.name, ex.mark, record.id)
            except StoreUnavailable:
                log.warning("%s[%s]: could not mark as dead-lettered", ex.task, ex.task_id)
        # a shed is counted and logged once per spell (workers.shedding), not once per job
        log.log(logging.DEBUG if reason == dl.SHED else logging.ERROR,
                "%s[%s]: dead-lettered to %s as %s (record %s): %s: %s", ex.task, ex.task_id,
                installation(self.app).topology.dead_letter_queue(ex.queue), reason, record.id,
                record.exception_type, record.exception_message)
        what = f"{record.exception_type}: {record.exception_message}" if exc else "-"
        _job(state, ex, "dead_lettered", reason=reason, record=record.id, error=what[:500],
             dlq=installation(self.app).topology.dead_letter_queue(ex.queue),
             **self._told(state, ex))
        raise DeadLettered(f"{reason}: {what[:500]} (dead-lettered to "
                           f"{installation(self.app).topology.dead_letter_queue(ex.queue)}, "
                           f"record {record.id})", reason, record.id)


def _job_due(state: WorkerState, ex: Execution, status: str, **fields: Any
             ) -> tuple[Any, ...] | None:
    """This delivery's job-status ``SET`` to send with the mark's own write, or None where
    it cannot ride along (no statuses, paused, or not the idempotency store's Redis)."""
    jobs = state.jobs
    if jobs is None or jobs.client is not state.idempotency.client:
        return None
    return jobs.due(ex.task_id, status, task=ex.task, queue=ex.queue, **fields)


def _job(state: WorkerState, ex: Execution, status: str, **fields: Any) -> None:
    """Record this delivery's job status (``workers.jobs``): a socket write, never raises."""
    count_outcome(ex.queue, status)
    if state.jobs is not None:
        state.jobs.write(ex.task_id, status, task=ex.task, queue=ex.queue, **fields)


def _attempt_of(headers: dict, request: Any) -> int:
    """The job's attempt number: the header a retry carries (in-call attempts included),
    else one past Celery's count of retries."""
    carried = headers.get(h.ATTEMPT)
    if isinstance(carried, int) and not isinstance(carried, bool) and carried >= 1:
        return carried
    return (request.retries or 0) + 1


def resilient_task(name: str, *, dependency: str, idempotent: bool,
                   **options: Any) -> Callable[[Callable[..., Any]], ResilientTask]:
    """Declare a task: its name (which routes it to its queue), dependency and idempotency."""
    if not isinstance(idempotent, bool):
        raise TypeError("idempotent must be True or False")

    def decorate(fn: Callable[..., Any]) -> ResilientTask:
        return shared_task(name=name, bind=True, base=ResilientTask, dependency=dependency,
                           idempotent=idempotent, **options)(fn)

    return decorate


def cause_first(exc: BaseException) -> str:
    """``exc`` for a log line, the root cause first: a retry that ran out of deadline or budget
    reads "HTTPStatusError: 503 ... (DeadlineExceeded: no room for attempt 3)", not the
    other way round with the cause at the end."""
    root = getattr(exc, "last_exception", None) or exc.__cause__
    if root is None or root is exc:
        return f"{type(exc).__name__}: {exc}"
    wrapper = str(exc).split("; last error:")[0]
    return f"{type(root).__name__}: {root} ({type(exc).__name__}: {wrapper})"
