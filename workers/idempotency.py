"""Idempotency-key store: "started" and "done" marks in Redis, with a TTL.

Every delivery of a resilient task takes a mark before it calls anything:

* no mark yet   -> this is the first run: the mark becomes ``started``;
* ``started``   -> a previous delivery began and never finished (worker killed, or a
  duplicate is running right now). Idempotent work runs again (the downstream honours the
  key); non-idempotent work is dead-lettered as "outcome unknown";
* ``done``      -> the effect already happened: the duplicate is acked without running;
* ``dead``      -> the message was dead-lettered: a duplicate is acked (``dlq replay`` clears it).

Taking the mark is one ``SET NX GET`` (Redis >= 7.0; a script on older servers): set only if
absent, and report what was there, atomically. The worker skips it where nothing can be there
(``Execution.reads_mark`` in ``workers.resilient``). The ``done`` mark is written without
waiting for Redis' reply when the store has a :class:`~workers.redis_line.ReplyLater` line
(the worker's does): it reaches Redis before the task's ack, and the task does not wait.

The mark is keyed by the idempotency key when the task carries one, otherwise by the task id
(which survives broker redelivery and Celery retries). A mark outlives any redelivery: its
TTL (``TIDEGATE_IDEMPOTENCY_TTL_S``, default 7 days) must exceed the longest time a message
can spend in a queue, DLQ replays included.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from resilience.errors import ConfigError, TransientError
from workers.redis_line import ReplyLater, ReplyLaterError

DEFAULT_TTL_S = 7 * 24 * 3600
PREFIX = "tidegate:idem"

# Redis < 7.0 only (SET cannot combine NX and GET there). KEYS[1] mark. ARGV: 1 started-record,
# 2 ttl ms. Returns the mark already there, or nil once it has set ours.
_BEGIN_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""


class StoreUnavailable(TransientError):
    """The idempotency store cannot be reached: the task must not run blind (nothing called)."""


class MarkState(StrEnum):
    NEW = "new"
    STARTED = "started"
    DONE = "done"
    DEAD = "dead"


@dataclass(frozen=True)
class Mark:
    """What a delivery found when it took its mark."""

    key: str
    state: MarkState
    worker: str | None = None
    at: float | None = None
    result: Any = None


def ttl_from_env() -> int:
    raw = os.environ.get("TIDEGATE_IDEMPOTENCY_TTL_S", str(DEFAULT_TTL_S))
    try:
        ttl = int(raw)
    except ValueError:
        raise ConfigError(
            f"TIDEGATE_IDEMPOTENCY_TTL_S must be whole seconds, got {raw!r}"
        ) from None
    if ttl <= 0:
        raise ConfigError(f"TIDEGATE_IDEMPOTENCY_TTL_S must be > 0, got {ttl}")
    return ttl


class IdempotencyStore:
    """Marks in Redis under ``tidegate:idem:<task>:<key>``. Thread-safe (redis-py pools)."""

    def __init__(self, client: Any, ttl_s: int = DEFAULT_TTL_S, prefix: str = PREFIX, *,
                 replies: ReplyLater | None = None) -> None:
        import redis

        if ttl_s <= 0:
            raise ConfigError(f"idempotency TTL must be > 0 s, got {ttl_s}")
        self.client = client
        self.ttl_ms = int(ttl_s * 1000)
        self.prefix = prefix
        self._begin = client.register_script(_BEGIN_LUA)
        self._set_nx_get = True  # until the server says SET NX GET is a syntax error (< 7.0)
        self._errors = (redis.exceptions.RedisError, OSError)
        self._syntax_error = redis.exceptions.ResponseError
        self._later = replies

    def key(self, task: str, key: str) -> str:
        return f"{self.prefix}:{task}:{key}"

    def _guard(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except self._errors as exc:
            raise StoreUnavailable(f"idempotency store unreachable ({what}): {exc}") from None

    def begin(self, task: str, key: str, worker: str | None = None) -> Mark:
        """Take the ``started`` mark atomically, or report the mark already there."""
        record = json.dumps({"s": "started", "w": worker or socket.gethostname(),
                             "t": time.time()})
        name = self.key(task, key)
        raw = self._guard("begin", lambda: self._take(name, record))
        if raw is None:
            return Mark(key, MarkState.NEW)
        doc = json.loads(raw)
        return Mark(key, MarkState(doc["s"]), doc.get("w"), doc.get("t"), doc.get("r"))

    def _take(self, name: str, record: str) -> Any:
        # One plain command, on every delivery's path: cheaper than the script, same atomicity
        # (set only if absent, and report what was there).
        if self._set_nx_get:
            try:
                return self.client.set(name, record, nx=True, get=True, px=self.ttl_ms)
            except self._syntax_error as exc:
                if "syntax" not in str(exc).lower():
                    raise
                self._set_nx_get = False
        return self._begin(keys=[name], args=[record, self.ttl_ms])

    def finish(self, task: str, key: str, result: Any = None) -> None:
        """Mark the effect as done; later duplicates are acked without running."""
        try:
            doc = json.dumps({"s": "done", "t": time.time(), "r": result}, default=str)
        except (TypeError, ValueError):
            doc = json.dumps({"s": "done", "t": time.time(), "r": None})
        if self._later is None:
            self._guard("finish", lambda: self.client.set(self.key(task, key), doc,
                                                          px=self.ttl_ms))
            return
        try:
            self._later.send("SET", self.key(task, key), doc, "PX", self.ttl_ms)
        except ReplyLaterError as exc:
            raise StoreUnavailable(f"idempotency store unreachable (finish): {exc}") from None

    def close(self) -> None:
        """Read the replies still owed to the done marks (at worker shutdown)."""
        if self._later is not None:
            self._later.close()

    def release(self, task: str, key: str) -> None:
        """Drop the mark: nothing reached the dependency, so a later try is a first try."""
        self._guard("release", lambda: self.client.delete(self.key(task, key)))

    def peek(self, task: str, key: str) -> Mark | None:
        raw = self._guard("peek", lambda: self.client.get(self.key(task, key)))
        if raw is None:
            return None
        doc = json.loads(raw)
        return Mark(key, MarkState(doc["s"]), doc.get("w"), doc.get("t"), doc.get("r"))

    def dead(self, task: str, key: str, record_id: str) -> None:
        """The message went to the DLQ: a duplicate delivery is acked, replay clears this."""
        doc = json.dumps({"s": "dead", "t": time.time(), "r": record_id})
        self._guard("dead", lambda: self.client.set(self.key(task, key), doc, px=self.ttl_ms))


def mark_key(idempotency_key: str | None, task_id: str | None) -> str:
    """The mark's key: the idempotency key, else the task id (kept across redeliveries)."""
    return f"key:{idempotency_key}" if idempotency_key else f"task:{task_id}"
