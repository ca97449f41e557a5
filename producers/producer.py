"""Enqueue jobs onto the work queues, refusing bad input before it reaches a broker.

Every call validates the task name, the queue and the JSON payload, then passes the gates in
the chain's order (docs/architecture.md): the per-client rate limit (429), queue-for-later
when the dependency's circuit is open, and the depth throttle (503, LOW shed first, CRITICAL
never).
It publishes with publisher confirms, a publish timeout and ``mandatory`` on RabbitMQ, and
turns a broker that cannot be reached within the connect timeout into
:class:`~workers.errors.BrokerUnavailable`, never a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from celery import Celery

from resilience.errors import RateLimited, TidegateError
from resilience.ratelimit import RateLimiter
from resilience.shedding import Priority
from workers.brokers import broker_for
from workers.installation import installation, load_app
from workers.jobs import JobStatuses
from workers.settings import Settings
from workers.topology import Topology

from . import metrics
from .backpressure import Throttle
from .broker_gate import BrokerGate
from .components import STATE_TIMEOUT_S as STATE_TIMEOUT_S
from .components import build_throttle, client_limiter, state_client
from .components import job_statuses as job_statuses
from .deferral import DeferralGate
from .model import AUTO, BatchAdmission, EnqueueResult, Job, Prepared
from .model import State as State
from .prepare import Preparing
from .publishing import BATCH_MECHANISMS, Publishing
from .sent_events import sent_events_for

__all__ = ["AUTO", "AsyncProducer", "EnqueueResult", "Job", "Producer", "client_limiter",
           "state_client"]

# The facade and its async twin live here; the data model (producers.model), validation
# (producers.prepare), publishing (producers.publishing) and the shared-state pieces
# (producers.components) in modules of their own, re-exported under the names used before.
_Prepared = Prepared
_BatchAdmission = BatchAdmission
_BATCH_MECHANISMS = BATCH_MECHANISMS


class Producer(Preparing, Publishing):
    """Publishes tasks for the workers. Thread-safe; one per process is plenty.

    ``throttle`` (depth backpressure) and ``deferral`` (queue-for-later on an open circuit)
    are built from the settings unless given; ``limiter`` applies to calls that name a
    ``client``. Pass ``None`` to go without a component.
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        max_message_bytes: int | None = None,
        throttle: Throttle | None = AUTO,
        limiter: RateLimiter | None = None,
        deferral: DeferralGate | None = AUTO,
        jobs: JobStatuses | None = AUTO,
    ):
        app = load_app() if app is None else app  # TIDEGATE_APP, else the shipped example
        self.app = app
        installed = installation(app)  # NotInstalled (one line) if Tidegate is not on it
        self.settings: Settings = installed.settings
        self.topology: Topology = installed.topology
        self.broker = broker_for(self.settings)  # everything that differs per broker
        self.max_message_bytes = max_message_bytes or self.settings.api_max_body_bytes
        app.loader.import_default_modules()
        needs_state = throttle is AUTO or deferral is AUTO or jobs is AUTO
        state = state_client(self.settings) if needs_state else None
        self.jobs = job_statuses(state) if jobs is AUTO else jobs
        self.throttle = (build_throttle(self.settings, self.topology, state)
                         if throttle is AUTO else throttle)
        self.deferral = (DeferralGate.from_settings(self.settings, self.topology, state)
                         if deferral is AUTO else deferral)
        self.limiter = limiter
        # Known down -> refused at once, re-probed in the background (producers.broker_gate).
        self._gate = BrokerGate(self._probe_broker)
        self._sent_events = sent_events_for(app)  # RabbitMQ: task-sent without its own confirm
        # statuses on the Redis broker's own server: "queued" rides in the publish transaction
        self._status_dbs = (self.broker.status_dbs(self.settings, self.jobs.client)
                            if self.jobs is not None and not (
                                app.conf.broker_transport_options or {}).get("global_keyprefix")
                            else None)

    # -- gates --------------------------------------------------------------------------------
    def _rate_limit(self, p: Prepared, client: str | None) -> None:
        if client is None or self.limiter is None:
            return
        try:
            self.limiter.acquire(client)
        except RateLimited:
            metrics.refused(p.queue, p.priority.name.lower(), "rate_limited").inc()
            raise

    def _rate_limit_many(self, jobs: list[tuple[Prepared, str | None]]
                         ) -> list[RateLimited | None]:
        """:meth:`_rate_limit` for several jobs in one store call (one Redis round trip):
        each job's refusal, or None where it may go on."""
        limiter = self.limiter
        asked = [k for k, (_, client) in enumerate(jobs) if client is not None]
        out: list[RateLimited | None] = [None] * len(jobs)
        if limiter is None or not asked:
            return out
        decisions = limiter.try_acquire_many([jobs[k][1] for k in asked])  # type: ignore[misc]
        for k, (allowed, retry_after) in zip(asked, decisions, strict=True):
            if not allowed:
                p, client = jobs[k]
                metrics.refused(p.queue, p.priority.name.lower(), "rate_limited").inc()
                out[k] = limiter.refusal(client or "-", retry_after)
        return out

    def _defer(self, p: Prepared, breakers: dict[str, Any] | None = None
               ) -> EnqueueResult | None:
        if self.deferral is None:
            return None
        deferred_id = self.deferral.maybe_defer(p.task, p.args, p.kwargs, p.priority,
                                                p.idempotency_key, breakers)
        if deferred_id is None:
            return None
        if self.jobs is not None:
            owner = self.topology.dependency_for_queue(p.queue)
            self.jobs.write(deferred_id, "deferred", task=p.task, queue=p.queue,
                            deferred_id=deferred_id, dependency=owner.name if owner else None)
        return self._done(EnqueueResult(deferred_id, "deferred", p.queue, p.task, p.priority,
                                        p.idempotency_key))

    def _wait_budget(self, p: Prepared, max_wait_s: float | None) -> float | None:
        if p.deadline_s is None:
            return max_wait_s
        default = self.throttle.config(p.queue).max_wait_s if self.throttle else 0.0
        return min(default if max_wait_s is None else max_wait_s, p.deadline_s / 2)

    # -- enqueueing -------------------------------------------------------------------------
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
        client: str | None = None,
        max_wait_s: float | None = None,
    ) -> EnqueueResult:
        """Publish one task, or raise a typed error instead of publishing anything doubtful.

        ``client`` names the caller for the rate limit; ``max_wait_s`` bounds how long a
        throttled call waits for admission (default: the queue's ``max_wait_ms``).
        Raises RateLimited, Backpressure, BrokerUnavailable or a validation error.
        """
        p = self._prepare(task, args, kwargs, priority, idempotency_key, queue, deadline_s,
                          task_id)
        return self._enqueue_prepared(p, client, max_wait_s)

    def _enqueue_prepared(self, p: Prepared, client: str | None, max_wait_s: float | None,
                          producer: Any = None) -> EnqueueResult:
        self._rate_limit(p, client)
        deferred = self._defer(p)
        if deferred is not None:
            return deferred
        if self.throttle is not None:
            # A broker known down refuses at once: the throttle's depth probe would try to
            # connect first (a RabbitMQ node stopping or booting holds it for the timeout).
            self._check_gate(p)
            self.throttle.admit(p.queue, p.priority, self._wait_budget(p, max_wait_s))
        self._publish(p, producer)
        return self._done(EnqueueResult(p.task_id, "queued", p.queue, p.task, p.priority,
                                        p.idempotency_key))

    def enqueue_many(
        self, jobs: Iterable[Job], *, client: str | None = None, max_wait_s: float | None = None
    ) -> list[EnqueueResult | TidegateError]:
        """Enqueue a batch at broker speed; one result or error per job, in order.

        Each job passes validation and admission as a single call would (rate limit,
        queue-for-later, the depth throttle, with the batch's own admitted jobs counted as
        already queued); the admitted ones are then published together: one transaction per
        queue on Redis, one wait for all confirms on RabbitMQ (:mod:`producers.batch`). A job
        is reported ``queued`` only once the broker confirmed it; one that failed validation,
        was refused, or that the broker refused or never confirmed holds its error instead,
        without stopping the others.
        """
        batch = BatchAdmission()
        for i, job in enumerate(jobs):
            try:
                p = self._prepare_job(job)
                self._rate_limit(p, client)
                deferred = self._defer(p, batch.breakers)
                if deferred is None and self.throttle is not None:
                    self._check_gate(p)  # known down: no depth probe (see enqueue)
                    self.throttle.admit(p.queue, p.priority, self._wait_budget(p, max_wait_s),
                                        batch.pending(p.queue))
            except TidegateError as exc:
                batch.refused(exc)
                continue
            batch.decided(i, p, deferred)
        return batch.done(self._publish_many(batch.admitted()))


class AsyncProducer:
    """The same producer for asyncio: throttle waits are ``asyncio.sleep``, not threads.

    Broker and Redis calls are blocking clients, so they run in worker threads
    (``asyncio.to_thread``); validation runs inline.
    """

    def __init__(self, producer: Producer | Celery | None = None) -> None:
        """``AsyncProducer(app)`` or ``AsyncProducer(Producer(app, ...))``."""
        self.producer = producer if isinstance(producer, Producer) else Producer(producer)

    async def enqueue(
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
        client: str | None = None,
        max_wait_s: float | None = None,
    ) -> EnqueueResult:
        pr = self.producer
        p = pr._prepare(task, args, kwargs, priority, idempotency_key, queue, deadline_s,
                        task_id)
        await asyncio.to_thread(pr._rate_limit, p, client)
        deferred = await asyncio.to_thread(pr._defer, p)
        if deferred is not None:
            return deferred
        if pr.throttle is not None:
            pr._check_gate(p)  # known down: no depth probe (see Producer.enqueue)
            await pr.throttle.admit_async(p.queue, p.priority, pr._wait_budget(p, max_wait_s))
        await asyncio.to_thread(pr._publish, p)
        return pr._done(EnqueueResult(p.task_id, "queued", p.queue, p.task, p.priority,
                                      p.idempotency_key))

    async def enqueue_many(
        self, jobs: Iterable[Job], *, client: str | None = None, max_wait_s: float | None = None
    ) -> list[EnqueueResult | TidegateError]:
        """:meth:`Producer.enqueue_many`: admission per job (throttle waits are sleeps), then
        one batch publish in a worker thread."""
        pr = self.producer
        batch = BatchAdmission()
        for i, job in enumerate(jobs):
            try:
                p = pr._prepare_job(job)
                await asyncio.to_thread(pr._rate_limit, p, client)
                deferred = await asyncio.to_thread(pr._defer, p, batch.breakers)
                if deferred is None and pr.throttle is not None:
                    pr._check_gate(p)
                    await pr.throttle.admit_async(p.queue, p.priority,
                                                  pr._wait_budget(p, max_wait_s),
                                                  pending=batch.pending(p.queue))
            except TidegateError as exc:
                batch.refused(exc)
                continue
            batch.decided(i, p, deferred)
        return batch.done(await asyncio.to_thread(pr._publish_many, batch.admitted()))
