"""Publishing prepared jobs to the broker: one at a time, or a batch at broker speed.

Every publish goes out with the broker's options (RabbitMQ: ``mandatory``, bounded confirms),
the ``tidegate_*`` headers a worker reads, and the job's "queued" status (in the publish
transaction where the statuses live on the Redis broker's own server). Where publishes wait
for confirms, a job's ``task-sent`` event goes out after it without one
(``producers.sent_events``). A broker that cannot be reached trips the broker gate
(``producers.broker_gate``) and becomes
:class:`~workers.errors.BrokerUnavailable`; a queue that vanished behind kombu's declaration
cache is declared again and published once more. A batch goes through the mechanism its
broker's adapter names (``producers.batch``). A mixin of :class:`~producers.producer.Producer`,
which holds the app, the adapter, the gate and the stores it reads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from resilience.errors import TidegateError
from workers import headers as h
from workers.brokers import BROKERS, BrokerAdapter
from workers.errors import BrokerUnavailable
from workers.jobs import JobStatuses
from workers.settings import Settings
from workers.topology import Topology

from . import metrics
from .backpressure import Throttle
from .batch import AmqpConfirms, NotConfirmed, redis_batch, sqs_batch
from .broker_gate import BrokerGate
from .messages import EventBatch, MessageTemplate, capture, fast_path_usable
from .model import EnqueueResult, Prepared
from .sent_events import SentEvents

__all__ = ["BATCH_MECHANISMS", "Publishing"]

log = logging.getLogger("producers.producer")  # the producer's log lines, wherever written

# How a batch reaches the broker: the mechanism its adapter names (BrokerAdapter.batch_publish),
# each a Producer method on top of producers.batch; a broker that names none is published one
# job at a time.
BATCH_MECHANISMS = {
    "multi_exec": "_redis_batch",  # one MULTI/EXEC per queue
    "confirms": "_amqp_batch",  # a confirm-mode channel, every confirm awaited once
    "send_message_batch": "_sqs_batch",  # SendMessageBatch in tens per queue
}
# Mechanisms that publish a batch's task-sent events as one message after its jobs (RabbitMQ:
# one message and confirm per batch instead of per job). On Redis each job's event stays in
# its queue's transaction, so an event exists exactly when its job does.
EVENTS_AFTER = {"_amqp_batch"}


class Publishing:
    """``Producer``'s publishing: :meth:`_publish` for one job, :meth:`_publish_many` for a
    batch, each job's result counted by :meth:`_done`."""

    app: Celery
    settings: Settings
    topology: Topology
    broker: BrokerAdapter
    jobs: JobStatuses | None
    throttle: Throttle | None
    _gate: BrokerGate
    _status_dbs: Any
    _sent_events: SentEvents | None

    def _done(self, result: EnqueueResult) -> EnqueueResult:
        metrics.ENQUEUED.labels(queue=result.queue, priority=result.priority.name.lower(),
                                state=result.state).inc()
        return result

    def _publish_many(self, ps: list[Prepared]) -> list[EnqueueResult | TidegateError]:
        """Publish admitted jobs together; each gets its result or its own error."""
        if not ps:
            return []
        try:
            self._check_gate()
        except BrokerUnavailable as exc:
            for p in ps:
                self._refused(p, "broker_unavailable")
            return [exc] * len(ps)
        try:
            with self.app.producer_or_acquire() as producer:
                mechanism = BATCH_MECHANISMS.get(self.broker.batch_publish or "")
                # task-sent events as one message after the jobs where the mechanism takes it
                events = EventBatch() if mechanism in EVENTS_AFTER else None
                sends = self._batch_sends(ps, producer, events)
                if events is not None:
                    outcomes = getattr(self, mechanism)(producer, ps, sends, events)
                elif mechanism is not None:
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

    def _send(self, p: Prepared, producer: Any) -> None:
        self.app.send_task(p.task, **self._send_options(p, producer))

    def _batch_sends(self, ps: list[Prepared], producer: Any, events: EventBatch | None = None
                     ) -> list[tuple[str, Any]]:
        """Each job's publish: from its (task, queue)'s message template where one could be
        made (:mod:`producers.messages`: Celery builds one message per group, kombu publishes
        every job of it), else ``send_task`` as for a single call."""
        plain = [(p.queue, functools.partial(self._send, p)) for p in ps]
        if not fast_path_usable(self.app):
            return plain
        templates: dict[tuple[str, str], MessageTemplate | None] = {}
        sends = []
        for p, fallback in zip(ps, plain, strict=True):
            key = (p.task, p.queue)
            if key not in templates:
                templates[key] = self._template(p, producer)
            template = templates[key]
            sends.append(fallback if template is None else
                         (p.queue, functools.partial(self._send_templated, template, p,
                                                     events)))
        return sends

    def _template(self, p: Prepared, producer: Any) -> MessageTemplate | None:
        """The message template of ``p``'s (task, queue), or None (then ``send_task``)."""
        own = self._message_headers(p, time.time())
        try:
            calls = capture(producer, lambda pr: self.app.send_task(
                p.task, **self._send_options(p, pr, own)))
            if not calls or calls[0][1] != self.broker.priority(p.priority):
                raise ValueError("the message priority is not the job's")
            return MessageTemplate(self.app, calls, p.task_id, p.args, p.kwargs, own)
        except Exception as exc:  # anything unexpected: Celery builds each message itself
            log.debug("no message template for %s on %s (%s): send_task per job",
                      p.task, p.queue, exc)
            return None

    def _send_templated(self, template: MessageTemplate, p: Prepared,
                        events: EventBatch | None, producer: Any) -> None:
        template.publish(producer, p.task_id, p.args, p.kwargs, self.broker.priority(p.priority),
                         self._message_headers(p, time.time()), events)

    def _redis_batch(self, producer: Any, ps: list[Prepared],
                     sends: list[tuple[str, Any]]) -> list[BaseException | None]:
        return redis_batch(producer, sends, self._queued_statuses(ps), self._status_dbs)

    def _queued_statuses(self, ps: list[Prepared]) -> list[tuple[Any, ...] | None]:
        """Each job's "queued" ``SET`` to run inside its publish transaction (statuses on the
        Redis broker's own server), else None. A paused status store gives None for all, and
        then nothing is written (as a paused ``write`` would not)."""
        if self._status_dbs is None or self.jobs is None:
            return [None] * len(ps)
        return [self.jobs.due(p.task_id, "queued", only_if="NX", **_queued_fields(p))
                for p in ps]

    def _publish_in_transaction(self, p: Prepared, producer: Any = None) -> None:
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

    def _sqs_batch(self, producer: Any, ps: list[Prepared],
                   sends: list[tuple[str, Any]]) -> list[BaseException | None]:
        return sqs_batch(producer, sends)

    def _amqp_batch(self, producer: Any, ps: list[Prepared], sends: list[tuple[str, Any]],
                    events: EventBatch | None = None) -> list[BaseException | None]:
        confirms = AmqpConfirms.for_connection(producer.connection)
        batch_producer = self.app.amqp.Producer(confirms.channel, auto_declare=False)
        timeout = self.settings.publish_timeout_s
        after = events.publish if events is not None else None
        outcomes = confirms.publish(batch_producer, sends, [p.task_id for p in ps], timeout,
                                    after)
        again = [i for i, o in enumerate(outcomes) if o is not None and _unroutable(o)]
        if again:  # a queue vanished behind kombu's declaration cache: declare, publish again
            log.warning("batch publish was unroutable for %d jobs; re-declaring the topology",
                        len(again))
            self._redeclare()
            producer.connection.declared_entities.clear()
            confirms = AmqpConfirms.for_connection(producer.connection)
            batch_producer = self.app.amqp.Producer(confirms.channel, auto_declare=False)
            retried = confirms.publish(batch_producer, [sends[i] for i in again],
                                       [ps[i].task_id for i in again], timeout, after)
            for i, outcome in zip(again, retried, strict=True):
                outcomes[i] = outcome
        return outcomes

    def _publish_error(self, p: Prepared, exc: BaseException) -> TidegateError:
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

    def _check_gate(self, p: Prepared | None = None) -> None:
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

    @staticmethod
    def _message_headers(p: Prepared, now: float) -> dict[str, Any]:
        """Tidegate's headers of one job's message (Celery adds them after its own)."""
        message_headers = {
            h.PRIORITY: p.priority.name,
            h.ENQUEUED_AT: now,
            h.IDEMPOTENCY_KEY: p.idempotency_key,
            h.DEADLINE: now + p.deadline_s if p.deadline_s else None,
            h.FRESH_ID: 1 if p.fresh_id else None,
        }
        return {k: v for k, v in message_headers.items() if v is not None}

    def _send_options(self, p: Prepared, producer: Any = None,
                      headers: dict[str, Any] | None = None) -> dict[str, Any]:
        """``app.send_task``'s options for one job (the same for a single and a batch)."""
        options = dict(
            args=p.args, kwargs=p.kwargs, task_id=p.task_id, queue=p.queue,
            priority=self.broker.priority(p.priority),
            headers=self._message_headers(p, time.time()) if headers is None else headers,
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

    def _publish(self, p: Prepared, producer: Any = None) -> None:
        if self._status_dbs is not None:
            return self._publish_in_transaction(p, producer)
        self._check_gate(p)
        options = self._send_options(p, producer)
        if self._sent_events is not None:  # task-sent after the job, without its own confirm
            options["event_dispatcher"] = self._sent_events
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

    def _refused(self, p: Prepared, reason: str) -> None:
        metrics.refused(p.queue, p.priority.name.lower(), reason).inc()

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


def _queued_fields(p: Prepared) -> dict[str, Any]:
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
