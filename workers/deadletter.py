"""Dead-letter queues: the record kept for each failed message, publishing it safely, and the
operator's list / show / replay / purge.

Every work queue ``q`` has a DLQ ``q.dlq`` bound to the ``tidegate.dlx`` exchange. A record is
published there (publisher confirms on RabbitMQ: the publish returns once the broker has it)
*before* the original message is acked, so a crash in between may duplicate a DLQ entry but
never loses one. On RabbitMQ the work queues also dead-letter natively into the same DLQ
(``x-dead-letter-exchange``): a message that a worker rejects without requeueing still lands
there, as the raw task message with RabbitMQ's ``x-death`` header; :func:`parse` reads both.
Publishing is the same on every broker; reading and removing records is each broker's own
(``dead_letters`` and ``take_dead_letters`` of its adapter, :mod:`workers.brokers`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
import traceback as tb
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kombu import Connection, Queue
from prometheus_client import Counter

from resilience.errors import PermanentError, TransientError
from resilience.metrics import get_or_create
from workers import headers as h
from workers.brokers import broker_for
from workers.errors import BrokerUnavailable
from workers.installation import installation
from workers.topology import Topology

DEAD_LETTERS = get_or_create(
    Counter,
    "tidegate_dead_letters_total",
    "Dead-letter records safely published, by origin queue and reason.",
    ("queue", "reason"),
)

RECORD_MARK = "tidegate_dead_letter"  # header set on every record Tidegate publishes

# Reasons, greppable in the DLQ and in logs.
TRANSIENT_NOT_IDEMPOTENT = "transient_failure_not_idempotent"
RETRIES_EXHAUSTED = "retries_exhausted"
REJECTIONS_EXHAUSTED = "dependency_unavailable"  # circuit open / bulkhead full, every attempt
PERMANENT = "permanent_failure"
OUTCOME_UNKNOWN = "outcome_unknown"
TIME_LIMIT = "time_limit"
SHED = "shed"  # an overloaded worker dropped it unrun (workers.shedding); replayable
INVALID_ARGUMENTS = "invalid_arguments"
UNKNOWN_TASK = "unknown_task"
UNDECODABLE = "undecodable"
BUG = "unexpected_error"
NATIVE = "rejected_by_broker"
NOT_REPLAYABLE = frozenset({UNKNOWN_TASK, UNDECODABLE, INVALID_ARGUMENTS})  # would fail again


class DeadLetterError(TransientError):
    """The dead-letter copy was NOT published: the original must not be acked."""


class NotReplayable(PermanentError):
    """A record that cannot be replayed as asked (poison, or needs ``--force``)."""


class RecordNotFound(PermanentError):
    """No record with that id in the dead-letter queue."""


@dataclass(frozen=True)
class DeadLetter:
    """Everything needed to understand and replay one failed message."""

    reason: str
    queue: str
    task: str | None = None
    task_id: str | None = None
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    idempotency_key: str | None = None
    idempotent: bool | None = None
    exception_type: str | None = None
    exception_message: str | None = None
    traceback: str | None = None
    attempts: int = 1
    worker: str = field(default_factory=socket.gethostname)
    first_seen: float | None = None
    dead_lettered_at: float = field(default_factory=time.time)
    raw_body: str | None = None  # poison messages: the body as received (text or base64)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def replayable(self) -> bool:
        return self.reason not in NOT_REPLAYABLE and self.task is not None

    @property
    def needs_force(self) -> bool:
        """Non-idempotent without an idempotency key: replaying may repeat the effect."""
        return self.idempotent is False and not self.idempotency_key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DeadLetter:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def with_error(self, exc: BaseException | None) -> DeadLetter:
        if exc is None:
            return self
        text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        return replace(self, exception_type=type(exc).__name__,
                       exception_message=str(exc)[:2000], traceback=text[-8000:])


def dead_letter_queue(topology: Topology, queue: str) -> Queue:
    return topology.dead_letter_kombu_queue(queue)


def _text(body: Any) -> str:
    if isinstance(body, bytes | bytearray):
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(bytes(body)).decode()
    return body if isinstance(body, str) else json.dumps(body, default=str)


def parse(body: Any, message_headers: dict | None, queue: str) -> DeadLetter:
    """A DLQ message as a record: one of ours, or a task message dead-lettered natively."""
    message_headers = dict(message_headers or {})
    doc: Any = body
    if isinstance(body, bytes | bytearray | str):
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
    if isinstance(doc, dict) and "reason" in doc and "queue" in doc:
        return DeadLetter.from_dict(doc)
    # A raw Celery (protocol 2) task message that the broker dead-lettered by itself.
    args, kwargs = [], {}
    if isinstance(doc, list) and len(doc) >= 2 and isinstance(doc[0], list):
        args, kwargs = doc[0], doc[1] if isinstance(doc[1], dict) else {}
    deaths = message_headers.get("x-death") or [{}]
    death = deaths[0] if isinstance(deaths, list) and deaths else {}
    origin = death.get("queue") or queue.removesuffix(".dlq")
    tid = message_headers.get("id")
    return DeadLetter(
        reason=NATIVE, queue=str(origin), task=message_headers.get("task"), task_id=tid,
        args=list(args), kwargs=dict(kwargs),
        headers={k: v for k, v in message_headers.items() if k.startswith("tidegate_")},
        idempotency_key=message_headers.get(h.IDEMPOTENCY_KEY),
        exception_message=f"broker dead-lettered it: {death.get('reason', 'rejected')}",
        attempts=int(message_headers.get("retries") or 0) + 1,
        first_seen=message_headers.get(h.FIRST_SEEN) or message_headers.get(h.ENQUEUED_AT),
        dead_lettered_at=_epoch(death.get("time")), worker="-",
        raw_body=None if doc is not None else _text(body), id=tid or uuid.uuid4().hex,
    )


def _epoch(value: Any) -> float:
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value) if isinstance(value, int | float) else time.time()


@contextlib.contextmanager
def _broker_errors(settings: Any) -> Iterator[None]:
    """Broker trouble as one clear, typed error (exit 3 in the CLI), password left out."""
    import redis
    from botocore.exceptions import BotoCoreError, ClientError
    from kombu.exceptions import KombuError, OperationalError

    try:
        yield
    except (OSError, OperationalError, KombuError, redis.exceptions.RedisError, BotoCoreError,
            ClientError) as exc:
        where = Connection(settings.broker_url).as_uri(include_password=False)
        raise BrokerUnavailable(f"broker unreachable at {where}: {exc}") from None


class DeadLetters:
    """Publish to and operate on the DLQs of one Celery app's broker."""

    def __init__(self, app: Any) -> None:
        self.app = app
        installed = installation(app)
        self.settings = installed.settings
        self.topology: Topology = installed.topology
        self.broker = broker_for(self.settings)

    # -- publishing (workers) ------------------------------------------------------------
    def publish(self, record: DeadLetter) -> None:
        """Publish ``record`` to its queue's DLQ and return only once the broker has it."""
        dlq = dead_letter_queue(self.topology, record.queue)
        timeout = self.settings.publish_timeout_s
        try:
            with self.app.producer_pool.acquire(block=True, timeout=timeout) as producer:
                producer.publish(
                    json.dumps(record.to_dict(), default=str), exchange=dlq.exchange,
                    routing_key=dlq.routing_key, declare=[dlq], content_type="application/json",
                    content_encoding="utf-8", delivery_mode=2,
                    headers={RECORD_MARK: 1, "id": record.id}, retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5,
                                  "interval_max": 1.0},
                )
        except Exception as exc:  # any failure means: not safely stored
            raise DeadLetterError(f"dead-letter copy to {dlq.name} not published: {exc!r}") \
                from exc
        DEAD_LETTERS.labels(queue=record.queue, reason=record.reason).inc()

    # -- operator side (reading and removing records: the broker's adapter) ---------------
    def connection(self) -> Connection:
        """A kombu connection to the app's broker, as its workers connect."""
        return Connection(self.app.conf.broker_url,  # kombu's form (sentinel: no query)
                          connect_timeout=self.settings.connect_timeout_s,
                          transport_options=self.app.conf.broker_transport_options)

    def list(self, queue: str, limit: int | None = None) -> list[DeadLetter]:
        """The records in ``queue``'s DLQ, oldest first, without removing them."""
        self.topology.check_queue(queue)
        with _broker_errors(self.settings):
            return self.broker.dead_letters(self, queue, limit)

    def show(self, queue: str, record_id: str) -> DeadLetter:
        matches = [r for r in self.list(queue) if r.id.startswith(record_id)]
        if not matches:
            dlq = self.topology.dead_letter_queue(queue)
            raise RecordNotFound(f"no record {record_id!r} in {dlq}")
        if len(matches) > 1 and not any(r.id == record_id for r in matches):
            raise RecordNotFound(f"id prefix {record_id!r} is ambiguous ({len(matches)} records)")
        return next((r for r in matches if r.id == record_id), matches[0])

    def take(self, queue: str, select: Callable[[DeadLetter], bool],
             handle: Callable[[DeadLetter], None]) -> Iterator[DeadLetter]:
        """Remove each selected record once ``handle`` returned for it (it yields each one).

        ``handle`` runs first: if it raises, the record stays in the DLQ.
        """
        self.topology.check_queue(queue)
        with _broker_errors(self.settings):
            yield from self.broker.take_dead_letters(self, queue, select, handle)

    def purge(self, queue: str) -> int:
        """Delete every record in ``queue``'s DLQ; returns how many there were."""
        self.topology.check_queue(queue)
        with _broker_errors(self.settings), self.connection() as conn:
            bound = dead_letter_queue(self.topology, queue)(conn.default_channel)
            bound.declare()
            return int(bound.purge() or 0)

    def replay_message(self, record: DeadLetter, *, force: bool = False) -> str:
        """Publish ``record``'s task again on its origin queue, same task id and key."""
        from resilience.shedding import Priority

        check_replayable(record, force=force)
        # A replay is a new decision: the old deadline and attempt count do not carry over.
        keep = {k: v for k, v in record.headers.items()
                if k in h.ALL and k not in (h.ATTEMPT, h.DEADLINE)}
        # its wait starts now (a worker sheds by it: an old time would shed it again at once)
        keep[h.ENQUEUED_AT] = time.time()
        keep["tidegate_replayed_from"] = record.id
        prio = keep.get(h.PRIORITY)
        priority = None
        if prio:
            priority = self.broker.priority(Priority.parse(prio))
        task_id = record.task_id or uuid.uuid4().hex
        jobs = self._job_statuses()
        # before the publish: a worker's "running" must land after it, never under it
        jobs.write(task_id, "replayed", wait=True, task=record.task, queue=record.queue,
                   record=record.id)
        try:
            self.app.send_task(record.task, args=list(record.args), kwargs=dict(record.kwargs),
                               task_id=task_id, queue=record.queue, headers=keep,
                               priority=priority, retry=False)
        except BaseException:
            jobs.write(task_id, "dead_lettered", wait=True, task=record.task,
                       queue=record.queue, reason=record.reason, record=record.id)
            raise
        return task_id

    def _job_statuses(self) -> Any:
        """Job states (``workers.jobs``) in the shared-state Redis, written and confirmed."""
        from resilience.stores import redis_client
        from workers.idempotency import ttl_from_env
        from workers.jobs import JobStatuses

        if getattr(self, "_jobs", None) is None:
            client = redis_client(self.settings.redis_url,
                                  socket_timeout=self.settings.read_timeout_s,
                                  socket_connect_timeout=self.settings.connect_timeout_s)
            self._jobs = JobStatuses(client, ttl_from_env())
        return self._jobs


def parse_envelope(envelope: dict[str, Any], dlq: str) -> DeadLetter:
    """A record from kombu's message envelope (the Redis and SQS transports store one)."""
    body = envelope.get("body")
    if (envelope.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return parse(body, envelope.get("headers"), dlq)


def check_replayable(record: DeadLetter, *, force: bool) -> None:
    if not record.replayable:
        raise NotReplayable(f"record {record.id} ({record.reason}) has no runnable task; "
                            "inspect it with `tidegate dlq show` and purge it")
    if record.needs_force and not force:
        raise NotReplayable(
            f"record {record.id}: {record.task} is not idempotent and carries no idempotency "
            f"key, and it was dead-lettered as {record.reason}: the effect may already have "
            "happened, so replaying may repeat it. Check the downstream, then use --force"
        )
