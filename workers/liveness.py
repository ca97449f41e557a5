"""Worker liveness: every worker process keeps a heartbeat in Redis from a thread of its own.

Why: on Redis and SQS a message a worker has taken stays invisible to every other worker until
the visibility timeout (an hour by default) when its worker dies without a goodbye (SIGKILL,
an OOM kill, a lost node). Knowing which workers are alive lets the others give a dead one's
work back within seconds (:mod:`workers.orphans`) and lets the exporter count live workers
per queue.

How: each worker process takes an id (node name, pid, a random suffix) and, from a thread that
task execution never blocks, sets ``_tidegate.worker.<id>`` every ``heartbeat_s`` with a TTL of
``heartbeat_ttl_s``, and its record (queues, last beat) in the ``_tidegate.workers`` hash, in
one script. A heartbeat key that has expired means the process stopped beating: it is dead,
or stalled for longer than the TTL (a long task does not stall it, the thread runs beside the
pool). On a Redis broker the heartbeats live in the broker's Redis, where the orphan sweep
reads them in the same script as the unacked records; on other brokers in the state Redis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["HEARTBEAT_PREFIX", "REGISTRY_KEY", "Periodic", "Registry", "WorkerRecord",
           "holder_id", "live_per_queue", "live_workers_per_queue", "new_worker_id"]

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "_tidegate.worker."  # + worker id: the heartbeat (TTL = heartbeat_ttl_s)
REGISTRY_KEY = "_tidegate.workers"  # worker id -> its last record (queues, last beat)
FORGET_AFTER_S = 24 * 3600  # a dead worker's record stays this long (its last beat is shown)
PRUNE_EVERY = 60  # beats between two prunes of the records (and at the first beat)

# KEYS: heartbeat, registry. ARGV: 1 worker id, 2 record json, 3 ttl ms.
BEAT = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
"""
# KEYS: registry. ARGV: 1 oldest last beat kept (epoch s). Dead workers' records go in time.
PRUNE = """
local rows, gone = redis.call('HGETALL', KEYS[1]), 0
for i = 1, #rows, 2 do
  local ok, r = pcall(cjson.decode, rows[i + 1])
  if not ok or type(r) ~= 'table' or tonumber(r['beat']) == nil
      or tonumber(r['beat']) < tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], rows[i])
    gone = gone + 1
  end
end
return gone
"""
# KEYS: heartbeat, registry. ARGV: 1 worker id. A clean exit: no one need wait for the TTL.
FORGET = """
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
"""

_holder: str | None = None  # this process's id while it beats (see holder_id)
_holder_pid: int | None = None


def new_worker_id(node: str) -> str:
    """``<node>.<pid>.<random>``: unique per process, and readable in ``tidegate depth``."""
    return f"{node}.{os.getpid()}.{secrets.token_hex(3)}"


def holder_id() -> str | None:
    """The liveness id of this process while its heartbeat runs, else None.

    The Redis transport records it as the holder of each message it fetches. A process that
    does not beat (a producer, a CLI, a forked child) records none: its messages are left to
    the visibility timeout, never taken for a dead worker's.
    """
    return _holder if _holder_pid == os.getpid() else None


def _set_holder(worker_id: str | None) -> None:
    global _holder, _holder_pid
    _holder, _holder_pid = worker_id, (os.getpid() if worker_id else None)


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    node: str
    pid: int
    queues: tuple[str, ...]
    started: float
    beat: float  # epoch seconds of the last heartbeat
    # how many tasks it runs at once (its pool's size): the status page's capacity
    concurrency: int | None = None

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "node": self.node, "pid": self.pid,
                           "queues": list(self.queues), "started": self.started,
                           "beat": self.beat, "concurrency": self.concurrency},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerRecord:
        d = json.loads(raw)
        concurrency = d.get("concurrency")  # absent in records of older workers
        return cls(str(d["id"]), str(d["node"]), int(d["pid"]), tuple(d["queues"]),
                   float(d["started"]), float(d["beat"]),
                   int(concurrency) if concurrency is not None else None)


class Registry:
    """Heartbeats and worker records in one Redis, under kombu's ``global_keyprefix`` if any.

    Only EVAL and commands kombu's key-prefixing client leaves alone (GET, EXISTS, HGETALL)
    are used, with keys prefixed here, so a plain and a prefixing client both work.
    """

    def __init__(self, client: Any, prefix: str = "") -> None:
        self.client = client
        self.prefix = prefix

    def heartbeat_key(self, worker_id: str) -> str:
        return f"{self.prefix}{HEARTBEAT_PREFIX}{worker_id}"

    @property
    def registry_key(self) -> str:
        return f"{self.prefix}{REGISTRY_KEY}"

    def beat(self, record: WorkerRecord, ttl_s: float) -> None:
        self.client.eval(BEAT, 2, self.heartbeat_key(record.id), self.registry_key, record.id,
                         record.to_json(), max(1, int(ttl_s * 1000)))

    def forget(self, worker_id: str) -> None:
        self.client.eval(FORGET, 2, self.heartbeat_key(worker_id), self.registry_key, worker_id)

    def prune(self, max_age_s: float = FORGET_AFTER_S) -> int:
        """Drop records whose last beat is older than ``max_age_s``; returns how many."""
        return int(self.client.eval(PRUNE, 1, self.registry_key, repr(time.time() - max_age_s)))

    def records(self) -> list[WorkerRecord]:
        """Every worker record still kept, live or dead (unreadable ones skipped)."""
        out = []
        for raw in self.client.hgetall(self.registry_key).values():
            try:
                out.append(WorkerRecord.from_json(raw))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def alive(self, worker_ids: Iterable[str]) -> set[str]:
        """The ids whose heartbeat key still exists."""
        ids = list(dict.fromkeys(worker_ids))
        if not ids:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for wid in ids:
            pipe.exists(self.heartbeat_key(wid))
        return {wid for wid, n in zip(ids, pipe.execute(), strict=True) if n}


def live_workers_per_queue(registry: Registry, queues: Iterable[str]) -> dict[str, int]:
    """How many workers with a live heartbeat consume each of ``queues``."""
    return live_per_queue(registry, queues)[0]


def live_per_queue(registry: Registry, queues: Iterable[str]
                   ) -> tuple[dict[str, int], dict[str, int | None]]:
    """Live workers per queue, and their capacity: the summed pool sizes of the live workers
    consuming it (a worker on two queues counts for both; None while a live worker has not
    said its size, an older version)."""
    records = registry.records()
    alive = registry.alive(r.id for r in records)
    counts = dict.fromkeys(queues, 0)
    capacity: dict[str, int | None] = dict.fromkeys(counts, 0)
    for r in records:
        if r.id in alive:
            for q in r.queues:
                if q in counts:
                    counts[q] += 1
                    have = capacity[q]
                    capacity[q] = (None if have is None or r.concurrency is None
                                   else have + r.concurrency)
    return counts, capacity


class Periodic:
    """Runs ``fn`` every ``interval_s`` on a daemon thread; an error is logged, not fatal."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], object]) -> None:
        self.name, self.interval_s, self.fn = name, interval_s, fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failing = False

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.fn()
                if self._failing:
                    log.info("%s: working again", self.name)
                self._failing = False
            except Exception as exc:  # the broker or Redis away: try again next tick
                if not self._failing:
                    log.warning("%s failed: %s: %s", self.name, type(exc).__name__, exc)
                self._failing = True
            wait = self.interval_s - (time.monotonic() - started)
            if self._stop.wait(max(0.05, wait)):
                return

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class Heartbeat:
    """This process's heartbeat: the caller (a :class:`Periodic`) beats every ``interval_s``.

    ``registry`` may be replaced between beats (a new connection after an error).
    """

    def __init__(self, registry: Registry, record: WorkerRecord, *, interval_s: float,
                 ttl_s: float) -> None:
        self.registry, self.record = registry, record
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self._beats = 0

    def beat(self) -> None:
        r = self.record
        self.registry.beat(dataclasses.replace(r, beat=time.time()), self.ttl_s)
        self._beats += 1
        if self._beats % PRUNE_EVERY == 1:
            self.registry.prune()

    def start_holding(self) -> None:
        """From now on this process's fetches name it as holder (before its first beat: the
        sweep leaves messages fetched less than a TTL ago alone)."""
        _set_holder(self.record.id)

    def stop(self) -> None:
        """A clean exit: no holder any more, and the heartbeat removed at once."""
        _set_holder(None)
        try:
            self.registry.forget(self.record.id)
        except Exception as exc:  # the TTL removes it anyway
            log.warning("heartbeat not removed at shutdown: %s", exc)
