"""Job status: what became of a job id, for ``GET /v1/jobs/{id}`` and ``tidegate job ID``.

One small key per job, ``tidegate:job:<id>`` in the shared-state Redis, holding the latest
state as JSON with a TTL (the idempotency TTL, ``TIDEGATE_IDEMPOTENCY_TTL_S``): written where
Tidegate already decides each step, so no result backend is needed. Each write is one ``SET``,
sent without waiting for its reply where the writer has a :class:`~workers.redis_line.ReplyLater`
line (workers and producers do): the hot path pays a socket write, not a round trip. A worker
sends "running" and "succeeded" in the same socket write as the task's run lease and done mark
(one write at each end of a task instead of two or three; the end one also carries the
message's ack where the statuses are on the Redis broker's server: ``workers.ack_writes``),
and a non-idempotent task's "running" inside the script that takes its mark
(:meth:`JobStatuses.due`). Where the statuses
live on the Redis broker's own server (``make run``: databases 0 and 1 of one server), the
Producer's "queued" goes inside the publish's own transaction (``producers.batch``).

=============  ===========================================================  ==============
state          written by                                                   extra fields
=============  ===========================================================  ==============
queued         the Producer after the publish (``NX``: never over a later   task, queue,
               state); a replay's new task id                               priority
running        the worker, before the task body runs                        worker, attempt
retrying       the worker, when it sends the task back with a countdown     error, retry_in_s
succeeded      the worker, after the done mark                              worker
failed         the worker, when the dead-letter copy could not be stored   error (outcome,
               (the message was rejected instead)                           message)
dead_lettered  the worker (or its consumer, for a poison message) once the  reason, record,
               DLQ record is stored                                         dlq, error
                                                                            (outcome, message:
                                                                            a graceful
                                                                            fallback's answer)
deferred       the worker or the Producer, once the request is in SQS      deferred_id,
                                                                            dependency
replayed       ``tidegate dlq replay`` (same id, runs again) and the        replay_id /
               replayer (a new id; the old job points at it)                record
=============  ===========================================================  ==============

A status is best effort: Redis being away never fails a task or an enqueue over it (a warning
is logged, and for ``PAUSE_S`` after a failed write no write is tried, so an unreachable Redis
costs one connect timeout per pause, not one per job). An id that was never seen, or is older
than the TTL, has no status (404).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import Counter

from resilience.metrics import get_or_create

log = logging.getLogger("tidegate.jobs")

# The same outcomes Celery's events report (SUCCESS, FAILURE for dead_lettered and failed, the
# custom DEFERRED), counted where they are decided; the exporter and the status page show the
# cluster totals (workers.cluster_metrics), so they count what Flower shows.
OUTCOMES = get_or_create(
    Counter, "tidegate_task_outcomes_total",
    "Tasks finished, by outcome: succeeded (Celery SUCCESS), dead_lettered and failed "
    "(FAILURE), deferred (DEFERRED).", ("queue", "outcome"))
FINAL = frozenset({"succeeded", "failed", "dead_lettered", "deferred"})

PREFIX = "tidegate:job:"
PAUSE_S = 1.0  # after a failed write, writes are skipped this long (Redis away: fail fast)
STATES = ("queued", "running", "retrying", "succeeded", "failed", "dead_lettered", "deferred",
          "replayed")

__all__ = ["FINAL", "OUTCOMES", "PREFIX", "STATES", "JobStatuses", "count_outcome", "job_key"]


def count_outcome(queue: str, outcome: str) -> None:
    """Count a task's final outcome (only the states in FINAL)."""
    if outcome in FINAL:
        OUTCOMES.labels(queue=queue, outcome=outcome).inc()


def job_key(job_id: str) -> str:
    return f"{PREFIX}{job_id}"


class JobStatuses:
    """Reads and writes job states in Redis. Thread-safe (redis-py pools, ReplyLater lines)."""

    def __init__(self, client: Any, ttl_s: int, *, replies: Any = None,
                 clock: Any = time.monotonic) -> None:
        self.client = client
        self.ttl_ms = int(ttl_s * 1000)
        self._replies = replies
        self._clock = clock
        self._paused_until = -1.0
        self.skipped = 0  # writes not tried during a pause

    def command(self, job_id: str, state: str, *, only_if: str | None = None,
                **fields: Any) -> tuple[Any, ...]:
        """The one ``SET`` that records ``state`` (``only_if``: "NX" or "XX")."""
        doc = {"state": state, "at": round(time.time(), 3),
               **{k: v for k, v in fields.items() if v is not None}}
        command: tuple[Any, ...] = ("SET", job_key(job_id), json.dumps(doc, default=str),
                                    "PX", self.ttl_ms)
        return (*command, only_if) if only_if else command

    def due(self, job_id: str | None, state: str, *, only_if: str | None = None,
            **fields: Any) -> tuple[Any, ...] | None:
        """The ``SET`` for ``state``, for a caller that sends it with its own writes (a
        worker's mark and lease, a producer's publish transaction); None when no write is due
        (no id, or writes paused after a failure). If that send fails, call :meth:`write`."""
        if not job_id or self._clock() < self._paused_until:
            return None  # (a paused write is counted as skipped by the caller's write())
        return self.command(job_id, state, only_if=only_if, **fields)

    def write(self, job_id: str | None, state: str, *, only_if: str | None = None,
              wait: bool = False, **fields: Any) -> None:
        """Record ``state`` for ``job_id`` (never raises). ``wait``: confirmed round trip."""
        if not job_id:
            return
        if self._clock() < self._paused_until:
            self.skipped += 1
            return
        command = self.command(job_id, state, only_if=only_if, **fields)
        try:
            if self._replies is not None and not wait:
                self._replies.send(*command)
            else:
                self.client.execute_command(*command)
        except Exception as exc:  # ReplyLaterError is an OSError; anything else: same answer
            self._paused_until = self._clock() + PAUSE_S
            log.warning("job %s: status %s not stored (job statuses paused %.0f s): %s",
                        job_id, state, PAUSE_S, exc)

    def write_many(self, writes: list[tuple[str, str, dict[str, Any]]], *,
                   only_if: str | None = None) -> None:
        """``(job_id, state, fields)`` records in one socket write, its replies read later
        as :meth:`write`'s are (without a ReplyLater line: one pipeline, one round trip);
        never raises, as :meth:`write`."""
        if not writes:
            return
        if self._clock() < self._paused_until:
            self.skipped += len(writes)
            return
        try:
            commands = [self.command(job_id, state, only_if=only_if, **fields)
                        for job_id, state, fields in writes]
            if self._replies is not None:
                self._replies.send_many(*commands)
                return
            with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                pipe.execute()
        except Exception as exc:  # the same answer as write(): pause, say so once
            self._paused_until = self._clock() + PAUSE_S
            log.warning("%d job statuses not stored (job statuses paused %.0f s): %s",
                        len(writes), PAUSE_S, exc)

    def read(self, job_id: str, *, follow: bool = True) -> dict[str, Any] | None:
        """The job's latest state, or None. A job replayed under a new id carries the new
        job's status as ``replay`` (one level). Raises redis errors: the caller says 503."""
        raw = self.client.get(job_key(job_id))
        if raw is None:
            return None
        doc = json.loads(raw)
        doc["id"] = job_id
        replay_id = doc.get("replay_id")
        if follow and replay_id and replay_id != job_id:
            doc["replay"] = self.read(replay_id, follow=False)
        return doc
