"""Idempotency-key store: "started" and "done" marks in Redis, with a TTL.

Every delivery of a resilient task takes a mark before it calls anything:

* no mark yet   -> this is the first run: the mark becomes ``started``;
* ``started``   -> a previous delivery began and never finished (worker killed, or a
  duplicate is running right now). Idempotent work runs again (the downstream honours the
  key); non-idempotent work is dead-lettered as "outcome unknown";
* ``done``      -> the effect already happened: the duplicate is acked without running;
* ``dead``      -> the message was dead-lettered: a duplicate is acked (``dlq replay`` clears it).

Taking the mark is one ``SET NX GET`` (Redis >= 7.0; a script on older servers): set only if
absent, and report what was there, atomically. The worker skips it where nothing can be
there (``Execution.reads_mark`` in ``workers.execution``). Where the store has a reply-later
line, the script that takes a non-idempotent task's mark (with its lease and "running") is a
round trip on it (``ReplyLater.call``: one send and one recv, no pool checkout). The
``done`` mark is written without waiting for Redis' reply when the store has a
:class:`~workers.redis_line.ReplyLater` line (the worker's does): it reaches Redis before
the task's ack, and the task does not wait; where the state is on the Redis broker's server,
the ack follows it in the same socket write on that line (``finish(ride=...)``,
``workers.ack_writes``).

**Run leases.** A ``started`` mark alone cannot tell a run that is still going from one whose
worker died. So each run also holds a lease, ``tidegate:idem-run:<task>:<key>``, with a short
TTL (``LEASE_S``) that a thread in the worker process keeps extending while the run lasts and
that ``finish``, ``release`` and ``dead`` delete. A delivery that finds the mark ``started``
(or absent) while another run holds the lease knows that run is in flight, in this worker or
another live one (:attr:`Mark.live`); ``workers.outcomes`` then parks it instead of running
it alongside. The lease is taken in the same pipelined round trip as the mark (``SET NX``), so
it costs no extra wait; the first run of fresh idempotent work, which skips the mark read,
sends its lease without waiting (:meth:`IdempotencyStore.hold`).

The mark is keyed by the idempotency key when the task carries one, otherwise by the task id
(which survives broker redelivery and Celery retries). A mark outlives any redelivery: its
TTL (``TIDEGATE_IDEMPOTENCY_TTL_S``, default 7 days) must exceed the longest time a message
can spend in a queue, DLQ replays included.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from resilience.errors import ConfigError, TransientError
from workers.redis_line import ReplyLater, ReplyLaterError

DEFAULT_TTL_S = 7 * 24 * 3600
PREFIX = "tidegate:idem"
LEASE_S = 10.0  # a run's lease outlives its worker by at most this

log = logging.getLogger("tidegate.worker")

# finish()'s hook: (its commands, the line's send) -> whether they will go with the ack
Ride = Callable[[tuple[tuple[Any, ...], ...], Callable[..., None]], bool]

# Redis < 7.0 only (SET cannot combine NX and GET there). KEYS[1] mark. ARGV: 1 started-record,
# 2 ttl ms. Returns the mark already there, or nil once it has set ours.
_BEGIN_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# The mark, the lease and the job's "running" status in one script (a standalone Redis: the three
# keys are in different cluster slots). KEYS: 1 mark, 2 lease, 3 job status. ARGV: 1 started
# record, 2 ttl ms, 3 lease token, 4 lease ttl ms, 5 status doc, 6 status ttl ms. The status
# is written only for a first run that took the lease (what the worker would write next).
# Returns {mark already there or '', 1 if the lease was taken}.
_BEGIN_RUNNING_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
local leased = redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4])
if leased then leased = 1 else leased = 0 end
if (not cur) and leased == 1 then redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6]) end
return {cur or '', leased}
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
    live: bool = False  # another run of this mark holds its lease: it is in flight right now
    leased: bool = False  # this run holds the lease (until ``let_go``)
    status_sent: bool = False  # the "running" status given to ``begin`` was written with it


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
                 replies: ReplyLater | None = None, lease_s: float = LEASE_S) -> None:
        import redis

        if ttl_s <= 0:
            raise ConfigError(f"idempotency TTL must be > 0 s, got {ttl_s}")
        self.client = client
        self.ttl_ms = int(ttl_s * 1000)
        self.prefix = prefix
        self._begin = client.register_script(_BEGIN_LUA)
        # a standalone server (not a cluster: its keys would be in different slots)
        self._begin_running = (client.register_script(_BEGIN_RUNNING_LUA)
                               if getattr(client, "connection_pool", None) is not None else None)
        self._set_nx_get = True  # until the server says SET NX GET is a syntax error (< 7.0)
        self._errors = (redis.exceptions.RedisError, OSError)
        self._syntax_error = redis.exceptions.ResponseError
        self._no_script = redis.exceptions.NoScriptError
        self._later = replies
        self._leases = Leases(client, lease_s)
        self._token = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def replies(self) -> ReplyLater | None:
        """The reply-later line the marks are written on (None: each write waits)."""
        return self._later

    def key(self, task: str, key: str) -> str:
        return f"{self.prefix}:{task}:{key}"

    def _guard(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except self._errors as exc:
            raise StoreUnavailable(f"idempotency store unreachable ({what}): {exc}") from None

    def lease_key(self, task: str, key: str) -> str:
        # Beside the marks, not under them: whatever scans the marks reads JSON records only.
        return f"{self.prefix}-run:{task}:{key}"

    def begin(self, task: str, key: str, worker: str | None = None,
              status: tuple[Any, ...] | None = None) -> Mark:
        """Take the ``started`` mark atomically, or report the mark already there; and take
        the run's lease unless another run holds it (then the mark is ``live``).

        ``status``: the job's "running" ``SET`` (``JobStatuses.due``), written in the same
        script when this is a first run that took the lease (``Mark.status_sent``), so a
        non-idempotent task pays one round trip before its body and no extra socket write."""
        record = json.dumps({"s": "started", "w": worker or socket.gethostname(),
                             "t": time.time()})
        name, lease = self.key(task, key), self.lease_key(task, key)
        sent = False
        if status is not None and self._begin_running is not None:
            raw, leased = self._guard("begin", lambda: self._take_running(name, record, lease,
                                                                          status))
            sent = raw is None and leased
        else:
            raw, leased = self._guard("begin", lambda: self._take(name, record, lease))
        if raw is None:
            if not leased:
                # No mark, yet a lease: a fresh run (no mark until done) is in flight.
                return Mark(key, MarkState.NEW, live=True)
            self._leases.hold(lease)
            return Mark(key, MarkState.NEW, leased=True, status_sent=sent)
        doc = json.loads(raw)
        state = MarkState(doc["s"])
        if leased and state is MarkState.STARTED:
            self._leases.hold(lease)  # the earlier run's lease had lapsed: this run takes over
        elif leased:
            self._guard("begin", lambda: self.client.delete(lease))  # done/dead: not a run
        return Mark(key, state, doc.get("w"), doc.get("t"), doc.get("r"),
                    live=state is MarkState.STARTED and not leased,
                    leased=leased and state is MarkState.STARTED)

    def _take(self, name: str, record: str, lease: str) -> tuple[Any, bool]:
        # One round trip, on every delivery's path: the mark (set only if absent, and report
        # what was there: SET NX GET, or a script before Redis 7.0) and the run's lease.
        pipe = self.client.pipeline(transaction=False)
        if self._set_nx_get:
            pipe.set(name, record, nx=True, get=True, px=self.ttl_ms)
        else:
            self._begin(keys=[name], args=[record, self.ttl_ms], client=pipe)
        pipe.set(lease, self._token, nx=True, px=self._leases.ttl_ms)
        try:
            raw, leased = pipe.execute()
        except self._syntax_error as exc:
            if not self._set_nx_get or "syntax" not in str(exc).lower():
                raise
            self._set_nx_get = False
            return self._take(name, record, lease)
        return raw, bool(leased)

    def _take_running(self, name: str, record: str, lease: str,
                      status: tuple[Any, ...]) -> tuple[Any, bool]:
        # status is ("SET", key, doc, "PX", ttl ms): the script writes it as it is
        _, job, doc, _, ttl_ms = status[:5]
        keys = [name, lease, job]
        args = [record, self.ttl_ms, self._token, self._leases.ttl_ms, doc, ttl_ms]
        replies = None
        if self._later is not None:
            replies = self._on_line(("EVALSHA", self._begin_running.sha, len(keys), *keys,
                                     *args))
        cur, leased = (replies[0] if replies is not None
                       else self._begin_running(keys=keys, args=args))
        return (cur or None), bool(leased)

    def _on_line(self, *commands: tuple[Any, ...]) -> list[Any] | None:
        """``commands``' replies through the reply-later line's round trip (one ``send``,
        one ``recv``: no pool checkout, ``ReplyLater.call``), or None where the caller must
        use its client instead: the script is not loaded on this server yet (the client's
        script object loads it), or the connection broke. A broken call may have run; the
        client's try then finds this delivery's own mark, as redis-py's retry of a command
        whose reply was lost always did. Any other error reply is raised, as the client's."""
        try:
            replies = self._later.call(*commands)  # type: ignore[union-attr]
        except ReplyLaterError as exc:
            log.warning("mark round trip on the reply-later line failed (%s); "
                        "trying the client", exc)
            return None
        for reply in replies:
            if isinstance(reply, self._no_script):
                return None
            if isinstance(reply, Exception):
                raise reply
        return replies

    def hold(self, task: str, key: str, also: tuple[tuple[Any, ...], ...] = ()) -> bool:
        """The lease alone, for a run that takes no mark first (fresh idempotent work): sent
        without waiting where the store has a reply-later line, in one socket write with
        ``also`` (the job's "running" status). Returns whether ``also`` was sent (not
        without a line: the caller writes it then)."""
        lease = self.lease_key(task, key)
        if self._later is None:
            self._guard("hold", lambda: self.client.set(lease, self._token,
                                                        px=self._leases.ttl_ms))
            self._leases.hold(lease)
            return False
        try:
            self._later.send_many(("SET", lease, self._token, "PX", self._leases.ttl_ms), *also)
        except ReplyLaterError as exc:
            raise StoreUnavailable(f"idempotency store unreachable (hold): {exc}") from None
        self._leases.hold(lease)
        return True

    def finish(self, task: str, key: str, result: Any = None,
               also: tuple[tuple[Any, ...], ...] = (), ride: Ride | None = None) -> bool:
        """Mark the effect as done; later duplicates are acked without running. ``also``
        (the job's "succeeded" status) goes in the same socket write where there is a
        reply-later line; returns whether it was sent (else the caller writes it).

        ``ride``: given the commands and the line's send, queues them to go with the
        message's ack (``workers.ack_writes``) and says whether it did."""
        try:
            doc = json.dumps({"s": "done", "t": time.time(), "r": result}, default=str)
        except (TypeError, ValueError):
            doc = json.dumps({"s": "done", "t": time.time(), "r": None})
        lease = self.lease_key(task, key)
        if self._later is None:
            self._guard("finish", lambda: self._set_and_drop(self.key(task, key), doc, lease))
            return False
        commands = (("SET", self.key(task, key), doc, "PX", self.ttl_ms), ("DEL", lease), *also)
        if ride is not None:
            # The ride goes out on the acking thread's line, not on this one: this thread's
            # earlier writes (the lease, "running") must be stored first, or Redis could run
            # them after the done mark (two connections keep no order between them): a lease
            # left behind and "running" over "succeeded". Their replies are what proves it;
            # they are usually in by now (the task's body ran since).
            try:
                self._later.flush()
            except ReplyLaterError as exc:
                raise StoreUnavailable(f"idempotency store unreachable (finish): {exc}") from None
            if ride(commands, self._later.send_many):
                return True
        try:
            self._later.send_many(*commands)
        except ReplyLaterError as exc:
            raise StoreUnavailable(f"idempotency store unreachable (finish): {exc}") from None
        return True

    def let_go(self, task: str, key: str) -> None:
        """The run is over: stop extending its lease (``finish``, ``release`` and ``dead``
        delete it; after any other end it lapses within ``LEASE_S``)."""
        self._leases.drop(self.lease_key(task, key))

    def close(self) -> None:
        """Read the replies still owed to the done marks (at worker shutdown)."""
        self._leases.stop()
        if self._later is not None:
            self._later.close()

    def release(self, task: str, key: str) -> None:
        """Drop the mark: nothing reached the dependency, so a later try is a first try."""
        lease = self.lease_key(task, key)
        self._guard("release", lambda: self.client.delete(self.key(task, key), lease))

    def peek(self, task: str, key: str) -> Mark | None:
        raw = self._guard("peek", lambda: self.client.get(self.key(task, key)))
        if raw is None:
            return None
        doc = json.loads(raw)
        return Mark(key, MarkState(doc["s"]), doc.get("w"), doc.get("t"), doc.get("r"))

    def dead(self, task: str, key: str, record_id: str) -> None:
        """The message went to the DLQ: a duplicate delivery is acked, replay clears this."""
        doc = json.dumps({"s": "dead", "t": time.time(), "r": record_id})
        lease = self.lease_key(task, key)
        self._guard("dead", lambda: self._set_and_drop(self.key(task, key), doc, lease))

    def _set_and_drop(self, mark: str, doc: str, lease: str) -> list[Any]:
        # Not chained: redis-py's cluster pipeline returns None from each command.
        pipe = self.client.pipeline(transaction=False)
        pipe.set(mark, doc, px=self.ttl_ms)
        pipe.delete(lease)
        return pipe.execute()


class Leases:
    """The run leases this process holds, extended every ``ttl/4`` by one daemon thread
    (started with the first lease, so in a prefork child, never in the parent)."""

    def __init__(self, client: Any, ttl_s: float) -> None:
        self.client = client
        self.ttl_ms = int(ttl_s * 1000)
        self._held: dict[str, int] = {}  # lease key -> runs of this process holding it
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def hold(self, lease: str) -> None:
        with self._lock:
            self._held[lease] = self._held.get(lease, 0) + 1
            if self._thread is None or self._pid != os.getpid():
                self._pid, self._wake = os.getpid(), threading.Event()
                self._thread = threading.Thread(target=self._refresh, daemon=True,
                                                name="tidegate-leases")
                self._thread.start()

    def drop(self, lease: str) -> None:
        with self._lock:
            n = self._held.pop(lease, 0) - 1
            if n > 0:
                self._held[lease] = n

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def stop(self) -> None:
        self._wake.set()

    def _refresh(self) -> None:
        wake = self._wake
        while not wake.wait(self.ttl_ms / 4000):
            leases = self.held()
            if not leases:
                continue
            try:
                pipe = self.client.pipeline(transaction=False)
                for lease in leases:
                    pipe.pexpire(lease, self.ttl_ms)
                pipe.execute()
            except Exception as exc:  # Redis away: the leases may lapse, runs go on
                log.warning("run leases not extended: %s", exc)


def mark_key(idempotency_key: str | None, task_id: str | None) -> str:
    """The mark's key: the idempotency key, else the task id (kept across redeliveries)."""
    return f"key:{idempotency_key}" if idempotency_key else f"task:{task_id}"
