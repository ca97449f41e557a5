"""What every broker adapter answers: the one place where Redis, RabbitMQ and SQS differ.

An adapter is a stateless object (one per broker family, in :data:`workers.brokers.BROKERS`);
everything that depends on the configuration takes the :class:`~workers.settings.Settings`.
The defaults here are plain kombu behaviour, so a new broker overrides only what it does
differently (docs/architecture.md, "Adding a broker").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from resilience.errors import ConfigError
from resilience.shedding import Priority

if TYPE_CHECKING:
    from workers.deadletter import DeadLetter, DeadLetters
    from workers.depth import DepthProbe
    from workers.settings import Settings

__all__ = ["BrokerAdapter", "priority_from_scale"]


def priority_from_scale(number: object, scale: Mapping[Priority, int]) -> Priority | None:
    """The Priority whose band holds ``number`` on a 0-9 ``scale`` (bands of three, as kombu's
    Redis steps): the inverse of ``scale`` for its own numbers, None for a non-number."""
    if isinstance(number, bool) or not isinstance(number, int | float):
        return None
    band = min(max(0, min(9, int(number))) // 3, 3)
    return next((p for p, n in scale.items() if min(n // 3, 3) == band), None)


class BrokerAdapter:
    """One broker family: its URL schemes and everything Tidegate does differently on it."""

    #: the family, as ``Settings.transport`` reports it (``redis``, ``amqp``, ``sqs``, ...)
    name: ClassVar[str]
    #: URL schemes (before any ``+``) that select this adapter
    schemes: ClassVar[tuple[str, ...]]
    #: Tidegate's priorities as this broker's message priority numbers; None: no priorities
    priorities: ClassVar[Mapping[Priority, int] | None] = None
    #: the broker marks a redelivered message (``delivery_info["redelivered"]``), so a repeat
    #: of a job can be told from a first delivery (``workers.execution``'s fresh ids)
    flags_redelivery: ClassVar[bool] = False
    #: a message rejected without requeue reaches its DLQ through the broker itself, so a
    #: worker that could not publish the dead-letter copy may reject instead of requeueing
    dead_letters_natively: ClassVar[bool] = False
    #: worker heartbeats live in the broker (its Redis), not in the shared-state Redis
    heartbeats_in_broker: ClassVar[bool] = False
    #: workers on this broker run the liveness threads (heartbeat, sweeps, extensions)
    runs_liveness: ClassVar[bool] = True
    #: how ``Producer.enqueue_many`` publishes a batch here (a mechanism of
    #: ``producers.publishing``'s ``BATCH_MECHANISMS``); None: one publish at a time
    batch_publish: ClassVar[str | None] = None
    #: the broker is an SQS endpoint: SQS is set up, so queue-for-later counts may be read
    provides_sqs: ClassVar[bool] = False

    # -- priorities ---------------------------------------------------------------------
    def priority(self, priority: Priority) -> int | None:
        """The message priority number to publish with (None where the broker has none)."""
        return None if self.priorities is None else self.priorities[priority]

    def priority_from(self, number: object) -> Priority | None:
        """The Priority of a message that carries only a broker number (a plain
        ``send_task``), on this broker's scale; None without a number or priorities."""
        return None if self.priorities is None else priority_from_scale(number, self.priorities)

    # -- connecting -------------------------------------------------------------------------
    def kombu_url(self, url: str) -> str:
        """The broker URL as kombu gets it."""
        return url

    def transport_options(self, settings: Settings) -> dict[str, Any]:
        """Celery's ``broker_transport_options``; each bounds every wait it can."""
        return {}

    def celery_conf(self, settings: Settings) -> dict[str, Any]:
        """Extra Celery settings (e.g. a transport class of Tidegate's own)."""
        return {}

    def publish_options(self, settings: Settings) -> dict[str, Any]:
        """Extra ``send_task`` options for every publish a producer makes."""
        return {}

    def unroutable(self, exc: BaseException) -> bool:
        """Whether a publish failed because no queue took the message (the queue vanished
        behind kombu's declaration cache: the producer declares again and retries once)."""
        return False

    def refused_publish(self, exc: BaseException) -> bool:
        """Whether ``exc`` from a publish is the broker refusing it (the producer answers
        "broker unavailable"), as opposed to a bug to raise."""
        return self.unroutable(exc)

    def client(self, settings: Settings, *, timeout_s: float | None = None) -> Any:
        """A client of the broker's own API, where Tidegate reads it directly (Redis, SQS);
        ``timeout_s`` bounds each call instead of the settings' timeouts."""
        raise ConfigError(f"no direct client for the {self.name!r} transport")

    def status_dbs(self, settings: Settings, client: Any) -> tuple[int, int] | None:
        """``(status db, broker db)`` when the job-status client ``client`` reaches the
        broker's own server, so a job's "queued" status can be written in the publish's own
        transaction (``producers.batch.redis_batch``); None: written after the publish."""
        return None

    # -- depth ------------------------------------------------------------------------------
    def depth_probe(self, settings: Settings) -> DepthProbe:
        """The probe that reads a queue's depth (``workers.depth``)."""
        raise ConfigError(f"no depth probe for the {self.name!r} transport")

    # -- worker liveness (workers.liveness_step) ---------------------------------------------
    def sweeps_orphans(self, settings: Settings) -> bool:
        """Whether workers sweep the messages a dead worker held (``workers.orphans``)."""
        return False

    def worker_threads(self, settings: Settings,
                       consumer: Any) -> list[tuple[str, float, Callable[[], Any]]]:
        """Periodic work each worker process runs beside its heartbeat, as
        ``(thread name, interval in seconds, work)``."""
        return []

    # -- dead-letter storage ----------------------------------------------------------------
    # Publishing a record is the same on every broker (a confirmed kombu publish to the DLQ,
    # workers.deadletter); reading and removing records is not. The default is AMQP's way:
    # ``basic_get`` without ack, and closing the channel puts every unacked message back.
    def dead_letters(self, dls: DeadLetters, queue: str, limit: int | None) -> list[DeadLetter]:
        """The records in ``queue``'s DLQ, oldest first, left in place."""
        from workers.deadletter import parse

        dlq = dls.topology.dead_letter_queue(queue)
        out: list[DeadLetter] = []
        with dls.connection() as conn:
            channel = conn.channel()
            try:
                bound = dls.topology.dead_letter_kombu_queue(queue)(channel)
                bound.declare()
                while limit is None or len(out) < limit:
                    message = bound.get(no_ack=False)
                    if message is None:
                        break
                    out.append(parse(message.body, message.headers, dlq))
            finally:
                channel.close()  # unacked: every message goes back where it was
        return out

    def take_dead_letters(self, dls: DeadLetters, queue: str,
                          select: Callable[[DeadLetter], bool],
                          handle: Callable[[DeadLetter], None]) -> Iterator[DeadLetter]:
        """Remove each selected record from ``queue``'s DLQ once ``handle`` returned for it."""
        from workers.deadletter import parse

        dlq = dls.topology.dead_letter_queue(queue)
        with dls.connection() as conn:
            channel = conn.channel()
            try:
                bound = dls.topology.dead_letter_kombu_queue(queue)(channel)
                bound.declare()
                while True:
                    message = bound.get(no_ack=False)
                    if message is None:
                        break
                    record = parse(message.body, message.headers, dlq)
                    if select(record):
                        handle(record)
                        message.ack()
                        yield record
            finally:
                channel.close()
