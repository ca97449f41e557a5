"""What goes into an enqueue and what comes out: the producer's data model.

:class:`Job` is one job of a batch as a caller writes it, :class:`Prepared` the same job once
validated (its queue resolved, its task id fixed), :class:`EnqueueResult` what happened to it.
:class:`BatchAdmission` keeps one ``enqueue_many``'s results in the batch's order while its
jobs are admitted one by one and published together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from resilience.errors import TidegateError
from resilience.shedding import Priority

__all__ = ["AUTO", "BatchAdmission", "EnqueueResult", "Job", "Prepared", "State"]

State = Literal["queued", "deferred"]


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
class Prepared:
    """A job that passed validation: what its publish and its gates read."""

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


class BatchAdmission:
    """One ``enqueue_many``'s bookkeeping, shared by :class:`Producer` and
    :class:`AsyncProducer` (only how each job is admitted differs: calls vs awaits).

    Results keep the batch's order; admitted jobs wait for the batch publish, and the ones
    admitted so far count as already queued for the depth throttle.
    """

    def __init__(self) -> None:
        self.results: list[EnqueueResult | TidegateError] = []
        self._admitted: list[tuple[int, Prepared]] = []
        self._pending: dict[str, int] = {}
        self.breakers: dict[str, Any] = {}  # breaker states read once per batch

    def pending(self, queue: str) -> int:
        return self._pending.get(queue, 0)

    def refused(self, exc: TidegateError) -> None:
        self.results.append(exc)

    def decided(self, i: int, p: Prepared, deferred: EnqueueResult | None) -> None:
        """Job ``i`` passed admission: deferred (its result now) or admitted for publish."""
        self.results.append(deferred)  # type: ignore[arg-type]  # None: filled in by done()
        if deferred is None:
            self._admitted.append((i, p))
            self._pending[p.queue] = self._pending.get(p.queue, 0) + 1

    def admitted(self) -> list[Prepared]:
        return [p for _, p in self._admitted]

    def done(self, published: list[EnqueueResult | TidegateError]
             ) -> list[EnqueueResult | TidegateError]:
        for (i, _), outcome in zip(self._admitted, published, strict=True):
            self.results[i] = outcome
        return self.results
