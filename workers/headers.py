"""The message headers Tidegate adds to every task, read back on the worker side.

Celery merges custom headers into ``task.request``; these names are the contract between
producers, workers, the dead-letter tooling and the replayer.
"""

from __future__ import annotations

IDEMPOTENCY_KEY = "tidegate_idempotency_key"
PRIORITY = "tidegate_priority"
DEADLINE = "tidegate_deadline"  # wall-clock epoch seconds: the enqueuer's total budget
ENQUEUED_AT = "tidegate_enqueued_at"
ATTEMPT = "tidegate_attempt"  # the job's next attempt number, in-call attempts included
FIRST_SEEN = "tidegate_first_seen"
DEFERRALS = "tidegate_deferrals"  # set by the replayer: how often this request was deferred
FIRST_DEFERRED_AT = "tidegate_first_deferred_at"  # epoch seconds of its first deferral
# Set on a retry once any earlier delivery's attempt reached (or may have reached) the
# dependency: a later refusal must not make the job's status say "not charged".
REACHED = "tidegate_reached"
# Set by the Producer on a task id it generated itself for that one publish: no other message
# can carry the id unless this one is redelivered. Not in ALL: retries and replays drop it.
FRESH_ID = "tidegate_fresh_id"
ALL = (IDEMPOTENCY_KEY, PRIORITY, DEADLINE, ENQUEUED_AT, ATTEMPT, FIRST_SEEN, DEFERRALS,
       FIRST_DEFERRED_AT, REACHED)


def read(request: object, name: str, default: object = None) -> object:
    """A Tidegate header from a Celery ``task.request`` (custom headers become attributes)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return default if value is None else value


def idempotency_key(request: object, explicit: str | None = None) -> str | None:
    """The task's idempotency key: an explicit argument wins over the message header."""
    return explicit or read(request, IDEMPOTENCY_KEY)  # type: ignore[return-value]
