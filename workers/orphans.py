"""The orphan sweep: a dead worker's unacked Redis messages go back to their queues in seconds.

Why: kombu's only way back for an unacked message is the visibility timeout (an hour by
default), and lowering it redelivers long tasks that are still running. The reliable fetch
(:mod:`workers.transport`) records who holds each message and every worker beats
(:mod:`workers.liveness`), so "held by a worker whose heartbeat expired" tells an orphan
apart from a long task, however long that task runs.

How: every worker tries a sweep every ``sweep_s``; a lock (``SET NX PX``) lets one of them
through per interval, with no extra process to deploy. One script takes the lock, reads the
holder records and returns the messages whose holder has no heartbeat and that were fetched
at least a heartbeat TTL ago (a worker that just started may not have written its first beat
yet). Each is then restored by kombu's own restore, in a transaction that watches the unacked
records and checks again that the same dead worker still holds it: a message acked, restored
or fetched again meanwhile is left alone. A restored message is marked redelivered and goes
to the head of its queue, so the idempotency marks decide as for any redelivery (run again
once per key, or ``outcome_unknown`` for non-idempotent work found started). The visibility
timeout stays as the last resort, for messages recorded without a holder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from prometheus_client import Counter

from workers import unacked
from workers.liveness import HEARTBEAT_PREFIX, REGISTRY_KEY, Registry, WorkerRecord
from workers.transport import HOLDERS_KEY

__all__ = ["ORPHANS_RESTORED", "ORPHAN_WAIT", "SWEEP", "SWEEP_LOCK_KEY", "Orphan", "Sweeper",
           "orphaned_per_queue"]

log = logging.getLogger(__name__)

SWEEP_LOCK_KEY = "_tidegate.orphan_sweep"

ORPHANS_RESTORED = Counter("tidegate_orphans_restored", "Unacked messages of dead workers "
                           "put back on their queue by the orphan sweep.", ["queue"])
ORPHAN_WAIT = Counter("tidegate_orphan_wait_seconds", "Sum over restored orphans of the time "
                      "from their holder's last heartbeat to the restore.", ["queue"])

# KEYS: 1 holders, 2 unacked_index, 3 lock. ARGV: 1 heartbeat key prefix, 2 now, 3 grace s,
# 4 lock owner, 5 lock ms. Returns false when another worker holds the lock, else a flat list
# tag, holder, fetched-at, ... of messages whose holder's heartbeat is gone. Holder records of
# messages no longer unacked are dropped here (a crash between two writes left them).
SWEEP = """
if not redis.call('SET', KEYS[3], ARGV[4], 'NX', 'PX', ARGV[5]) then return false end
local now, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HGETALL', KEYS[1])
local alive, out = {}, {}
for i = 1, #held, 2 do
  local tag, w = held[i], held[i + 1]
  if alive[w] == nil then alive[w] = redis.call('EXISTS', ARGV[1] .. w) == 1 end
  if not alive[w] then
    local at = redis.call('ZSCORE', KEYS[2], tag)
    if not at then
      redis.call('HDEL', KEYS[1], tag)
    elseif now - tonumber(at) >= grace then
      out[#out + 1] = tag
      out[#out + 1] = w
      out[#out + 1] = at
    end
  end
end
return out
"""


@dataclass(frozen=True)
class Orphan:
    tag: str
    holder: str
    fetched_at: float


class Sweeper:
    """Restores the orphans of dead workers through one kombu Redis channel (ours)."""

    def __init__(self, channel: Any, *, owner: str, interval_s: float, grace_s: float) -> None:
        self.channel = channel
        self.owner, self.interval_s, self.grace_s = owner, interval_s, grace_s

    def find(self) -> list[Orphan] | None:
        """Take this interval's lock and list the orphans; None if another worker has it."""
        ch = self.channel
        # a hair under the interval, so the next worker's try is never refused by a tie
        lock_ms = max(100, int(self.interval_s * 1000) - 100)
        with ch.conn_or_acquire() as client:
            reply = client.eval(SWEEP, 3, ch._key(HOLDERS_KEY), ch._key(ch.unacked_index_key),
                                ch._key(SWEEP_LOCK_KEY), ch._key(HEARTBEAT_PREFIX),
                                repr(time.time()), self.grace_s, self.owner, lock_ms)
        if reply is None:
            return None
        it = iter(reply)
        return [Orphan(bytes_to_str(t), bytes_to_str(w), float(a))
                for t, w, a in zip(it, it, it, strict=True)]

    def sweep(self) -> int:
        """One pass: returns how many messages were restored (0 if not this worker's turn)."""
        orphans = self.find()
        if not orphans:
            return 0
        beats = self._last_beats({o.holder for o in orphans})
        restored: dict[str, list[tuple[str, float, float]]] = {}
        for orphan in orphans:
            queue = self._restore(orphan)
            if queue is None:
                continue
            now = time.time()
            last_beat = beats.get(orphan.holder, orphan.fetched_at)
            ORPHANS_RESTORED.labels(queue=queue).inc()
            ORPHAN_WAIT.labels(queue=queue).inc(max(0.0, now - last_beat))
            restored.setdefault(orphan.holder, []).append(
                (queue, now - orphan.fetched_at, now - last_beat))
        for holder, items in restored.items():
            queues = sorted({q for q, _, _ in items})
            log.warning("orphan sweep: %d message(s) of dead worker %s back on %s "
                        "(held up to %.1f s; last heartbeat %.1f s ago)", len(items), holder,
                        ",".join(queues), max(h for _, h, _ in items), items[0][2])
        return sum(len(v) for v in restored.values())

    def _last_beats(self, holders: set[str]) -> dict[str, float]:
        """Each dead holder's last beat, from its record (kept after its heartbeat expired)."""
        ch = self.channel
        with ch.conn_or_acquire() as client:
            raw = client.hmget(ch._key(REGISTRY_KEY), sorted(holders))
        out = {}
        for value in raw:
            try:
                record = WorkerRecord.from_json(value) if value else None
            except (ValueError, KeyError, TypeError):
                record = None
            if record is not None:
                out[record.id] = record.beat
        return out

    def _restore(self, orphan: Orphan) -> str | None:
        """kombu's restore_by_tag, only if ``orphan.holder`` still holds it and is still dead.

        Returns the queue (routing key) it went back to, or None if it was left alone.
        """
        ch, qos = self.channel, self.channel.qos
        heartbeat = ch._key(HEARTBEAT_PREFIX + orphan.holder)
        outcome: list[str] = []

        def restore(pipe: Any) -> None:
            outcome.clear()
            raw = pipe.hget(qos.unacked_key, orphan.tag)
            holder = pipe.hget(HOLDERS_KEY, orphan.tag)
            if raw is None or bytes_to_str(holder or b"") != orphan.holder:
                return  # acked, restored, or fetched again by someone else meanwhile
            if pipe.exists(heartbeat):
                return  # it beats again: a stall, not a death
            message, exchange, routing_key = loads(bytes_to_str(raw))
            pipe.multi()
            qos._remove_from_indices(orphan.tag, pipe)
            ch._do_restore_message(message, exchange, routing_key, pipe, False)
            outcome.append(routing_key or exchange)

        with ch.conn_or_acquire() as client:
            # kombu's client prefixes WATCH/HGET itself: names go unprefixed, as kombu does
            client.transaction(restore, qos.unacked_key, HOLDERS_KEY)
        return outcome[0] if outcome else None


def orphaned_per_queue(client: Any, queues: set[str], unacked_key: str = "unacked",
                       prefix: str = "") -> dict[str, int]:
    """Unacked messages per queue held by a worker whose heartbeat is gone (plain client).

    What ``tidegate depth`` shows as held by dead workers until the sweep restores it.
    """
    held = client.hgetall(f"{prefix}{HOLDERS_KEY}")
    counts = dict.fromkeys(queues, 0)
    if not held:
        return counts
    registry = Registry(client, prefix)
    alive = registry.alive(bytes_to_str(w) for w in held.values())
    dead_tags = [t for t, w in held.items() if bytes_to_str(w) not in alive]
    if not dead_tags:
        return counts
    return unacked.per_queue(client.hmget(f"{prefix}{unacked_key}", dead_tags), queues)
