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
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from resilience.errors import ConfigError, RateLimited, TidegateError
from resilience.ratelimit import RateLimitConfig, RateLimiter
from resilience.shedding import Priority
from resilience.stores import RedisStore, redis_client
from workers import headers as h
from workers.brokers import BROKERS, broker_for
from workers.depth import SharedDepthCache, probe_for
from workers.errors import BrokerUnavailable, InvalidPayload, UnknownQueue, UnknownTask
from workers.idempotency import ttl_from_env
from workers.installation import installation, load_app
from workers.jobs import JobStatuses
from workers.redis_line import ReplyLater
from workers.settings import Settings
from workers.topology import Topology

from . import metrics
from .backpressure import Throttle, load_backpressure
from .batch import AmqpConfirms, NotConfirmed, redis_batch, sqs_batch
from .broker_gate import BrokerGate
from .deferral import DeferralGate

__all__ = ["AUTO", "AsyncProducer", "EnqueueResult", "Job", "Producer", "client_limiter",
           "state_client"]

log = logging.getLogger(__name__)

State = Literal["queued", "deferred"]
STATE_TIMEOUT_S = 0.5  # shared-state calls sit on every enqueue: never wait long on Redis


# How a batch reaches the broker: the mechanism its adapter names (BrokerAdapter.batch_publish),
# each a Producer method on top of producers.batch; a broker that names none is published one
# job at a time.
_BATCH_MECHANISMS = {
    "multi_exec": "_redis_batch",  # one MULTI/EXEC per queue
    "confirms": "_amqp_batch",  # a confirm-mode channel, every confirm awaited once
    "send_message_batch": "_sqs_batch",  # SendMessageBatch in tens per queue
}


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


AUTO: Any = _Auto()
"""Build the component from the app's settings (pass None to go without it)."""


@dataclass(frozen=True)
class EnqueueResult:
    """What happened to one enqueue: its task id, state and queue."""

    id: str
    state: State
    queue: str
    task: str
    priority: Priority
    idempotency_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "queue": self.queue, "task": self.task,
                "priority": self.priority.name.lower(), "idempotency_key": self.idempotency_key}


@dataclass(frozen=True)
class Job:
    """One job of a batch (the same fields as :meth:`Producer.enqueue`)."""

    task: str
    args: tuple[Any, ...] | list[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: Priority | str | int = Priority.HIGH
    idempotency_key: str | None = None
    queue: str | None = None
    deadline_s: float | None = None
    task_id: str | None = None


@dataclass(frozen=True)
class _Prepared:
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: Priority
    queue: str
    idempotency_key: str | None
    deadline_s: float | None
    task_id: str
    started: float
    fresh_id: bool = False  # task_id generated here for this one publish (h.FRESH_ID)


class _BatchAdmission:
    """One ``enqueue_many``'s bookkeeping, shared by :class:`Producer` and
    :class:`AsyncProducer` (only how each job is admitted differs: calls vs awaits).

    Results keep the batch's order; admitted jobs wait for the batch publish, and the ones
    admitted so far count as already queued for the depth throttle.
    """

    def __init__(self) -> None:
        self.results: list[EnqueueResult | TidegateError] = []
        self._admitted: list[tuple[int, _Prepared]] = []
        self._pending: dict[str, int] = {}
        self.breakers: dict[str, Any] = {}  # breaker states read once per batch

    def pending(self, queue: str) -> int:
        return self._pending.get(queue, 0)

    def refused(self, exc: TidegateError) -> None:
        self.results.append(exc)

    def decided(self, i: int, p: _Prepared, deferred: EnqueueResult | None) -> None:
        """Job ``i`` passed admission: deferred (its result now) or admitted for publish."""
        self.results.append(deferred)  # type: ignore[arg-type]  # None: filled in by done()
        if deferred is None:
            self._admitted.append((i, p))
            self._pending[p.queue] = self._pending.get(p.queue, 0) + 1

    def admitted(self) -> list[_Prepared]:
        return [p for _, p in self._admitted]

    def done(self, published: list[EnqueueResult | TidegateError]
             ) -> list[EnqueueResult | TidegateError]:
        for (i, _), outcome in zip(self._admitted, published, strict=True):
            self.results[i] = outcome
        return self.results


def state_client(settings: Settings) -> Any:
    """The shared-state Redis client producers use (short timeouts: it is on every call)."""
    return redis_client(settings.redis_url, socket_timeout=STATE_TIMEOUT_S,
                        socket_connect_timeout=STATE_TIMEOUT_S)


def job_statuses(client: Any) -> JobStatuses:
    """Job states written without waiting for Redis' reply (``workers.jobs``)."""
    replies = ReplyLater(client, name="tidegate-jobs") if getattr(
        client, "connection_pool", None) is not None else None
    return JobStatuses(client, ttl_from_env(), replies=replies)


def build_throttle(settings: Settings, topology: Topology, client: Any = None) -> Throttle:
    """The depth throttle from the policy file's ``[backpressure]`` tables."""
    default, per_queue = load_backpressure(settings.policy_file, topology)
    cache = SharedDepthCache(probe_for(settings, topology), client or state_client(settings))
    return Throttle(cache, default, per_queue)


def client_limiter(settings: Settings, config: RateLimitConfig, client: Any = None,
                   name: str = "producer-client") -> RateLimiter:
    """A per-client limiter shared by every producer through Redis (GCRA, one Lua call)."""
    store = RedisStore(client or state_client(settings), name=name)
    return RateLimiter(name, config, store)


class Producer:
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
        # statuses on the Redis broker's own server: "queued" rides in the publish transaction
        self._status_dbs = (self.broker.status_dbs(self.settings, self.jobs.client)
                            if self.jobs is not None and not (
                                app.conf.broker_transport_options or {}).get("global_keyprefix")
                            else None)

    # -- validation -------------------------------------------------------------------------
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
                 task_id: str | None) -> _Prepared:
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
        return _Prepared(task, list(args), dict(kwargs), prio, target, idempotency_key,
                         deadline_s, task_id or str(uuid.uuid4()), time.monotonic(),
                         fresh_id=task_id is None)

    # -- gates --------------------------------------------------------------------------------
    def _rate_limit(self, p: _Prepared, client: str | None) -> None:
        if client is None or self.limiter is None:
            return
        try:
            self.limiter.acquire(client)
        except RateLimited:
            metrics.REFUSED.labels(queue=p.queue, priority=p.priority.name.lower(),
                                   reason="rate_limited").inc()
            raise

    def _defer(self, p: _Prepared, breakers: dict[str, Any] | None = None
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

    def _wait_budget(self, p: _Prepared, max_wait_s: float | None) -> float | None:
        if p.deadline_s is None:
            return max_wait_s
        default = self.throttle.config(p.queue).max_wait_s if self.throttle else 0.0
        return min(default if max_wait_s is None else max_wait_s, p.deadline_s / 2)

    def _done(self, result: EnqueueResult) -> EnqueueResult:
        metrics.ENQUEUED.labels(queue=result.queue, priority=result.priority.name.lower(),
                                state=result.state).inc()
        return result

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

    def _enqueue_prepared(self, p: _Prepared, client: str | None, max_wait_s: float | None,
                          producer: Any = None) -> EnqueueResult:
        self._rate_limit(p, client)
        deferred = self._defer(p)
        if deferred is not None:
            return deferred
        if self.throttle is not None:
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
        batch = _BatchAdmission()
        for i, job in enumerate(jobs):
            try:
                p = self._prepare_job(job)
                self._rate_limit(p, client)
                deferred = self._defer(p, batch.breakers)
                if deferred is None and self.throttle is not None:
                    self.throttle.admit(p.queue, p.priority, self._wait_budget(p, max_wait_s),
                                        batch.pending(p.queue))
            except TidegateError as exc:
                batch.refused(exc)
                continue
            batch.decided(i, p, deferred)
        return batch.done(self._publish_many(batch.admitted()))

    def _prepare_job(self, job: Job) -> _Prepared:
        return self._prepare(job.task, job.args, job.kwargs, job.priority, job.idempotency_key,
                             job.queue, job.deadline_s, job.task_id)

    def _publish_many(self, ps: list[_Prepared]) -> list[EnqueueResult | TidegateError]:
        """Publish admitted jobs together; each gets its result or its own error."""
        if not ps:
            return []
        try:
            self._check_gate()
        except BrokerUnavailable as exc:
            for p in ps:
                self._refused(p, "broker_unavailable")
            return [exc] * len(ps)
        sends = [(p.queue, functools.partial(self._send, p)) for p in ps]
        try:
            with self.app.producer_or_acquire() as producer:
                mechanism = _BATCH_MECHANISMS.get(self.broker.batch_publish or "")
                if mechanism is not None:
                    outcomes = getattr(self, mechanism)(producer, ps, sends)
                else:  # one publish at a time
                    outcomes = [_outcome(send, producer) for _, send in sends]
        except (OperationalError, KombuError, OSError, TimeoutError) as exc:
            outcomes = [exc] * len(ps)  # no connection: nothing was published
        results: list[EnqueueResult | TidegateError] = []
        counts: dict[str, int] = {}
        statuses: list[tuple[str, str, dict[str, Any]]] = []
        for p, outcome in zip(ps, outcomes, strict=True):
            if outcome is None:
                counts[p.queue] = counts.get(p.queue, 0) + 1
                if self._status_dbs is None:  # else written in the publish transaction
                    statuses.append((p.task_id, "queued", _queued_fields(p)))
                results.append(self._done(EnqueueResult(p.task_id, "queued", p.queue, p.task,
                                                         p.priority, p.idempotency_key)))
            else:
                results.append(self._publish_error(p, outcome))
        if self.throttle is not None:
            for queue, n in counts.items():
                self.throttle.cache.record_published(queue, n)
        if self.jobs is not None:  # NX: a worker may have moved a job on already
            self.jobs.write_many(statuses, only_if="NX")
        return results

    def _send(self, p: _Prepared, producer: Any) -> None:
        self.app.send_task(p.task, **self._send_options(p, producer))

    def _redis_batch(self, producer: Any, ps: list[_Prepared],
                     sends: list[tuple[str, Any]]) -> list[BaseException | None]:
        return redis_batch(producer, sends, self._queued_statuses(ps), self._status_dbs)

    def _queued_statuses(self, ps: list[_Prepared]) -> list[tuple[Any, ...] | None]:
        """Each job's "queued" ``SET`` to run inside its publish transaction (statuses on the
        Redis broker's own server), else None. A paused status store gives None for all, and
        then nothing is written (as a paused ``write`` would not)."""
        if self._status_dbs is None or self.jobs is None:
            return [None] * len(ps)
        return [self.jobs.due(p.task_id, "queued", only_if="NX", **_queued_fields(p))
                for p in ps]

    def _publish_in_transaction(self, p: _Prepared, producer: Any = None) -> None:
        """One job whose "queued" status lives on the Redis broker's own server: the message,
        its signal, its ``task-sent`` event and the status in one ``MULTI``/``EXEC``, one round
        trip (a ``send_task`` makes two, and the status was a third socket write). Raises as
        :meth:`_publish` does."""
        self._check_gate(p)
        status = self._queued_statuses([p])
        try:
            with self.app.producer_or_acquire(producer) as kombu_producer:
                [outcome] = redis_batch(kombu_producer, [(p.queue, functools.partial(
                    self._send, p))], status, self._status_dbs)
        except (OperationalError, KombuError, OSError, TimeoutError) as exc:
            outcome = exc  # no connection: nothing was published
        if outcome is not None:
            raise self._publish_error(p, outcome) from None
        if self.throttle is not None:
            self.throttle.cache.record_published(p.queue)
        if status[0] is None and self.jobs is not None:  # paused: counted as skipped
            self.jobs.write(p.task_id, "queued", only_if="NX", **_queued_fields(p))

    def _sqs_batch(self, producer: Any, ps: list[_Prepared],
                   sends: list[tuple[str, Any]]) -> list[BaseException | None]:
        return sqs_batch(producer, sends)

    def _amqp_batch(self, producer: Any, ps: list[_Prepared],
                    sends: list[tuple[str, Any]]) -> list[BaseException | None]:
        confirms = AmqpConfirms.for_connection(producer.connection)
        batch_producer = self.app.amqp.Producer(confirms.channel, auto_declare=False)
        timeout = self.settings.publish_timeout_s
        outcomes = confirms.publish(batch_producer, sends, [p.task_id for p in ps], timeout)
        again = [i for i, o in enumerate(outcomes) if o is not None and _unroutable(o)]
        if again:  # a queue vanished behind kombu's declaration cache: declare, publish again
            log.warning("batch publish was unroutable for %d jobs; re-declaring the topology",
                        len(again))
            self._redeclare()
            producer.connection.declared_entities.clear()
            confirms = AmqpConfirms.for_connection(producer.connection)
            batch_producer = self.app.amqp.Producer(confirms.channel, auto_declare=False)
            retried = confirms.publish(batch_producer, [sends[i] for i in again],
                                       [ps[i].task_id for i in again], timeout)
            for i, outcome in zip(again, retried, strict=True):
                outcomes[i] = outcome
        return outcomes

    def _publish_error(self, p: _Prepared, exc: BaseException) -> TidegateError:
        """The error a job gets for an ``exc`` from its publish (see :meth:`_publish`)."""
        if isinstance(exc, TidegateError):
            return exc
        self._refused(p, "broker_unavailable")
        if isinstance(exc, NotConfirmed):
            return BrokerUnavailable(f"the broker did not confirm the publish to {p.queue!r} "
                                     f"(it may or may not hold job {p.task_id}): {exc}")
        if _connection_lost(exc):
            self._gate.trip(exc)
            return BrokerUnavailable(f"broker unreachable at {self._safe_broker()}: {exc}")
        return BrokerUnavailable(f"broker refused the publish to {p.queue!r}: "
                                 f"{type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _producer(self) -> Iterator[Any]:
        self._check_gate()
        try:
            with self.app.producer_or_acquire() as producer:
                yield producer
        except (OperationalError, KombuError, OSError, TimeoutError) as exc:
            self._gate.trip(exc)
            raise BrokerUnavailable(f"broker unreachable at {self._safe_broker()}: {exc}"
                                    ) from None

    def _check_gate(self, p: _Prepared | None = None) -> None:
        down = self._gate.down_for()
        if down is None:
            return
        if p is not None:
            self._refused(p, "broker_unavailable")
        raise BrokerUnavailable(f"broker unreachable at {self._safe_broker()}: down for "
                                f"{down[0]:.1f}s ({down[1]}); re-probing in the background")

    def _probe_broker(self) -> None:
        """Connect afresh, once, within the connect timeout (the gate's background probe)."""
        conn = self.app.connection_for_write()
        try:
            conn.ensure_connection(max_retries=1, timeout=self.settings.connect_timeout_s)
        finally:
            conn.release()

    def _publish_options(self) -> dict[str, Any]:
        return self.broker.publish_options(self.settings)  # RabbitMQ: mandatory, bounded

    def _send_options(self, p: _Prepared, producer: Any = None) -> dict[str, Any]:
        """``app.send_task``'s options for one job (the same for a single and a batch)."""
        now = time.time()
        message_headers = {
            h.PRIORITY: p.priority.name,
            h.ENQUEUED_AT: now,
            h.IDEMPOTENCY_KEY: p.idempotency_key,
            h.DEADLINE: now + p.deadline_s if p.deadline_s else None,
            h.FRESH_ID: 1 if p.fresh_id else None,
        }
        options = dict(
            args=p.args, kwargs=p.kwargs, task_id=p.task_id, queue=p.queue,
            priority=self.broker.priority(p.priority),
            headers={k: v for k, v in message_headers.items() if v is not None},
            retry=False, producer=producer, **self._publish_options(),
        )
        if producer is not None and self._declared(p.queue, producer):
            options["declare"] = []
        return options

    def _declared(self, queue: str, producer: Any) -> bool:
        """Whether kombu's declaration cache already holds ``queue`` on ``producer``'s
        connection: then ``maybe_declare`` would only bind a copy of the queue (and of its
        exchange) to the channel to find it there, about a tenth of a batched publish's
        CPU. Celery declares it when it is not (``declare=None``); the cache is kombu's own,
        so a queue deleted behind it is handled as before (``_redeclare``)."""
        entity = self.app.amqp.queues.get(queue)
        if entity is None or not entity.can_cache_declaration:
            return False
        try:
            return hash(entity) in producer.connection.declared_entities
        except (AttributeError, TypeError):  # no connection (yet): let kombu decide
            return False

    def _publish(self, p: _Prepared, producer: Any = None) -> None:
        if self._status_dbs is not None:
            return self._publish_in_transaction(p, producer)
        self._check_gate(p)
        options = self._send_options(p, producer)
        try:
            try:
                self.app.send_task(p.task, **options)
            except Exception as exc:
                if not self.broker.unroutable(exc):
                    raise
                # The queue vanished behind kombu's declaration cache: declare it again,
                # forget what the cache remembers, and publish once more.
                log.warning("publish to %s was unroutable; re-declaring the topology", p.queue)
                self._redeclare()
                self.app.send_task(p.task, **options)
        except (OperationalError, KombuError, OSError, TimeoutError) as exc:
            self._refused(p, "broker_unavailable")
            self._gate.trip(exc)
            raise BrokerUnavailable(
                f"broker unreachable at {self._safe_broker()}: {exc}"
            ) from None
        except Exception as exc:
            if not self.broker.refused_publish(exc):
                raise
            self._refused(p, "broker_unavailable")
            raise BrokerUnavailable(f"broker refused the publish to {p.queue!r}: {exc}"
                                    ) from None
        if self.throttle is not None:
            self.throttle.cache.record_published(p.queue)
        if self.jobs is not None:  # NX: a worker may have moved the job on already
            self.jobs.write(p.task_id, "queued", only_if="NX", **_queued_fields(p))

    def _refused(self, p: _Prepared, reason: str) -> None:
        metrics.REFUSED.labels(queue=p.queue, priority=p.priority.name.lower(),
                               reason=reason).inc()

    def _redeclare(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.settings.connect_timeout_s)
            self.topology.declare(conn)
        with self.app.producer_pool.acquire(block=True, timeout=self.settings.connect_timeout_s
                                            ) as producer:
            producer.connection.declared_entities.clear()

    def _safe_broker(self) -> str:
        """The broker URL without its password, for error messages and logs."""
        return self.app.connection_for_write().as_uri(include_password=False)


def _queued_fields(p: _Prepared) -> dict[str, Any]:
    return {"task": p.task, "queue": p.queue, "priority": p.priority.name.lower()}


def _unroutable(exc: BaseException) -> bool:
    """A mandatory message that no queue took (RabbitMQ's adapter knows the reply code)."""
    return BROKERS["amqp"].unroutable(exc)


def _connection_lost(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, OperationalError | OSError | TimeoutError | redis.ConnectionError
                      | redis.TimeoutError) or type(exc).__name__ in {
        "RecoverableConnectionError", "ConnectionForced"}


def _outcome(send: Any, producer: Any) -> BaseException | None:
    try:
        send(producer)
    except Exception as exc:
        return exc
    return None


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
        batch = _BatchAdmission()
        for i, job in enumerate(jobs):
            try:
                p = pr._prepare_job(job)
                await asyncio.to_thread(pr._rate_limit, p, client)
                deferred = await asyncio.to_thread(pr._defer, p, batch.breakers)
                if deferred is None and pr.throttle is not None:
                    await pr.throttle.admit_async(p.queue, p.priority,
                                                  pr._wait_budget(p, max_wait_s),
                                                  pending=batch.pending(p.queue))
            except TidegateError as exc:
                batch.refused(exc)
                continue
            batch.decided(i, p, deferred)
        return batch.done(await asyncio.to_thread(pr._publish_many, batch.admitted()))
