"""Queue topology, declared once: one work queue per dependency, each with a dead-letter queue.

The policy file names each dependency's queue and the task-name patterns routed to it; the
Celery app, producers, depth probes and the dead-letter tooling all read this one object.
One queue per dependency is the bulkhead at the broker: a hanging payments provider fills the
``payments`` queue, while ``celery -A workers worker -Q search`` keeps draining search.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kombu import Exchange, Queue

from resilience.errors import ConfigError, did_you_mean
from resilience.shedding import Priority

DEFAULT_QUEUE = "default"
DLQ_SUFFIX = ".dlq"
DLX_EXCHANGE = "tidegate.dlx"
WORKER_KEYS = frozenset({"queue", "url", "tasks"})
# RabbitMQ queue types a policy file may ask for (``[queues] queue_type``, docs/ha.md).
QUEUE_TYPES = ("classic", "quorum")

# Celery users expect CRITICAL to jump the queue on every broker, so the number sent depends on
# the broker: each adapter's ``priorities`` (workers.brokers).
AMQP_MAX_PRIORITY = 9
# kombu's stock Redis layout (its defaults, which every stock client - Flower, `celery
# --broker=URL inspect`, a bare Celery producer - assumes): a message of priority n goes to
# "<queue>" for the step 0, else "<queue>" + REDIS_SEP + "<step>", the step being the largest
# of REDIS_PRIORITY_STEPS not above n. The separator also joins the exchange bindings
# ("_kombu.binding.*"), so a different one breaks every stock client's control commands.
REDIS_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


@dataclass(frozen=True)
class Dependency:
    """One downstream dependency: where its work queues, where it lives, its policy table."""

    name: str
    queue: str
    url: str
    tasks: tuple[str, ...]
    policy: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Topology:
    """All dependencies and the queues they imply."""

    dependencies: tuple[Dependency, ...]
    # queue -> "quorum" for the queues the policy file declares as quorum queues; every other
    # queue is classic (RabbitMQ only: other brokers ignore it)
    queue_types: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def queue_type(self, queue: str) -> str:
        """``"classic"`` or ``"quorum"``: how ``queue`` (or the work queue of a DLQ) is
        declared on RabbitMQ."""
        return self.queue_types.get(queue.removesuffix(DLQ_SUFFIX), "classic")

    @property
    def work_queues(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for dep in self.dependencies:
            seen.setdefault(dep.queue)
        seen.setdefault(DEFAULT_QUEUE)
        return tuple(seen)

    def dependency(self, name: str) -> Dependency:
        for dep in self.dependencies:
            if dep.name == name:
                return dep
        known = [d.name for d in self.dependencies]
        raise ConfigError(f"unknown dependency {name!r}{did_you_mean(name, known)}")

    def dependency_for_queue(self, queue: str) -> Dependency | None:
        """The dependency whose tasks feed ``queue`` (the first one that declares tasks)."""
        owners = [d for d in self.dependencies if d.queue == queue]
        return next((d for d in owners if d.tasks), owners[0] if owners else None)

    def queue_for_task(self, task_name: str) -> str:
        for dep in self.dependencies:
            if any(fnmatch.fnmatchcase(task_name, pattern) for pattern in dep.tasks):
                return dep.queue
        return DEFAULT_QUEUE

    def check_queue(self, queue: str) -> str:
        if queue not in self.work_queues:
            raise ConfigError(f"unknown queue {queue!r}{did_you_mean(queue, self.work_queues)}")
        return queue

    @staticmethod
    def dead_letter_queue(queue: str) -> str:
        return f"{queue}{DLQ_SUFFIX}"

    def queue_arguments(self, queue: str) -> dict[str, Any]:
        """RabbitMQ's declare arguments for work queue ``queue`` (other transports ignore them).

        Each work queue dead-letters natively (``x-dead-letter-exchange``) into its DLQ. A
        classic queue supports priorities (``x-max-priority``); a quorum queue refuses that
        argument on RabbitMQ 3.x (4.x has two levels without it), so priority there is the
        producers' admission alone, and it dead-letters at least once (kept until the DLQ
        confirms, which RabbitMQ allows only with ``x-overflow = reject-publish``).
        """
        dead_letter = {"x-dead-letter-exchange": DLX_EXCHANGE,
                       "x-dead-letter-routing-key": self.dead_letter_queue(queue)}
        if self.queue_type(queue) == "quorum":
            return {"x-queue-type": "quorum", **dead_letter,
                    "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        return {"x-max-priority": AMQP_MAX_PRIORITY, **dead_letter}

    def kombu_queues(self) -> list[Queue]:
        """The work queues as kombu declares them (what a worker consumes by default)."""
        return [
            Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                  durable=True, queue_arguments=self.queue_arguments(name))
            for name in self.work_queues
        ]

    def dead_letter_kombu_queues(self) -> list[Queue]:
        """One DLQ per work queue, bound to the dead-letter exchange. Never consumed by default.
        A quorum work queue's DLQ is a quorum queue too: its dead letters survive a node."""
        return [self.dead_letter_kombu_queue(n) for n in self.work_queues]

    def dead_letter_kombu_queue(self, queue: str) -> Queue:
        """The DLQ of work queue ``queue`` as kombu declares it."""
        dlq = self.dead_letter_queue(queue)
        return Queue(dlq, Exchange(DLX_EXCHANGE, type="direct", durable=True), routing_key=dlq,
                     durable=True,
                     queue_arguments=({"x-queue-type": "quorum"}
                                      if self.queue_type(queue) == "quorum" else None))

    @property
    def quorum(self) -> bool:
        """Whether any queue is a quorum queue (Celery then turns global QoS off)."""
        return any(t == "quorum" for t in self.queue_types.values())

    def declare(self, connection: Any) -> None:
        """Declare every work queue and DLQ on ``connection`` (idempotent on every broker)."""
        channel = connection.default_channel
        for queue in self.dead_letter_kombu_queues() + self.kombu_queues():
            queue(channel).declare()


def broker_priority(priority: Priority, transport: str) -> int | None:
    """The message priority number for ``transport`` (None where the broker has none: SQS);
    its adapter's scale (``workers.brokers``)."""
    from workers.brokers import broker_named

    return broker_named(transport).priority(priority)


def redis_priority_lists(queue: str, sep: str = REDIS_SEP) -> list[str]:
    """The Redis lists that hold ``queue``'s ready messages, highest priority first."""
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in REDIS_PRIORITY_STEPS]


def priority_from_broker(number: object, transport: str) -> Priority | None:
    """The Priority of a message that carries only a broker priority (a plain ``send_task``):
    the inverse of :func:`broker_priority` on ``transport``'s scale, None without a number
    (or without priorities: SQS)."""
    from workers.brokers import broker_named

    return broker_named(transport).priority_from(number)


def load_topology(path: Path) -> Topology:
    """The policy file's ``[dependencies.*]`` tables as a Topology (the whole file is checked:
    see :mod:`workers.policy_file`)."""
    from workers.policy_file import load_policy_file

    return load_policy_file(path).topology
