"""kombu's Redis transport with a fetch that cannot lose a message to ``kill -9``.

Why: kombu's Redis transport takes a message off its queue with ``BRPOP`` and records it as
unacked (``HSET unacked`` + ``ZADD unacked_index``) in a second, separate step in the consumer
process (``Channel._brpop_read`` then ``QoS.append``). A worker SIGKILLed between the two loses
the message for good: it is in no list and in no unacked record, so no visibility timeout
brings it back (celery/celery#7950, celery/kombu#305; still so in kombu 5.7). ``tidegate demo``
saw it under load. docs/architecture.md promises "worker killed mid-task: redelivered (late ack)".

How: a message leaves its queue list only inside one Lua script that also records it as
unacked, in kombu's exact format (``unacked[tag] = [payload, exchange, routing_key]`` and
``unacked_index[tag] = now``), so kombu's own ``ack``/``reject``/``restore_visible`` work
unchanged. The consumer's blocking ``BRPOP`` (still on the hub socket, as kombu does it) now
waits on a per-queue *signal* list (``_tidegate.signal.<queue>``) that the publisher rings in
the same transaction as its ``LPUSH``; a token, or the ``BRPOP`` timeout, runs the script. The
timeout keeps messages found that arrive without a token (bare Celery/kombu producers, kombu's
stock restore, a token lost with a killed worker): at most ``brpop_timeout`` (1 s) late. A token
without a message is harmless. The script keeps each signal list honest for the queues it
reads (emptied when the queue is empty, one token left when messages remain), and a publish
caps it and gives it a TTL, so a queue nobody consumes (a DLQ) keeps a small, expiring one.

The consumer does not write that record a second time: kombu's ``QoS.append`` (an ``HSET`` +
``ZADD`` round trip per message) is skipped for the message the script has just recorded, and
only for it (the transport remembers that one delivery tag while it hands the message over).
A message put back by kombu's restore (visibility timeout, reject with requeue, shutdown)
rings its queue's signal list in the restore's own transaction, so it is fetched at once
rather than when the ``BRPOP`` times out. Every publish, fetch, ack and restore shares one
redis-py client object per connection pool instead of building one per call as kombu does.

Each record also names its holder, in the same script: ``_tidegate.unacked_holder`` maps the
delivery tag to the liveness id of the worker that fetched it (:mod:`workers.liveness`), and
kombu's index removal (ack, reject, every restore) drops that entry in its own pipeline. That
is all :mod:`workers.orphans` needs to give a dead worker's messages back within seconds
instead of after the visibility timeout.

Everything else is kombu's, with kombu's defaults for the wire format: priorities (``sep``,
``priority_steps``: see ``workers.topology.REDIS_SEP``), bindings, the queue cycle, fanout
(pub/sub), restore, ``global_keyprefix``. So stock clients (Flower, ``celery --broker=URL
inspect``, a bare Celery producer) share the broker with these workers unchanged. Queues
consumed with ``no_ack`` (Celery's reply queues) are popped without an unacked record, as
before. Off with ``TIDEGATE_REDIS_RELIABLE_FETCH=false`` (``workers.application``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis import exceptions as redis_errors

from workers import ack_writes, liveness

log = logging.getLogger("tidegate.worker")

SIGNAL_PREFIX = "_tidegate.signal."  # never "<queue><sep><n>": not a queue's sub-list
SIGNAL_CAP = 100  # tokens kept per queue: wakes that many idle consumers at once
SIGNAL_TTL_MS = 3_600_000  # a signal list nobody reads disappears; tokens are only hints
HOLDERS_KEY = "_tidegate.unacked_holder"  # delivery tag -> liveness id of the worker holding it

# KEYS[1] signal list. ARGV: 1 cap, 2 ttl ms. EVAL, not EVALSHA: kombu's key-prefixing client
# rewrites EVALSHA's first key but leaves EVAL alone, so keys arrive here already prefixed.
RING = """
redis.call('LPUSH', KEYS[1], '1')
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# RING rung ARGV[1] times at once (a batch's jobs of one queue, producers/batch.py): the same
# end state, one command instead of one per message. KEYS[1] signal list. ARGV: 1 count,
# 2 cap, 3 ttl ms.
RING_MANY = """
local n = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]))
for _ = 1, n do redis.call('LPUSH', KEYS[1], '1') end
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
"""

# KEYS: unacked, unacked_index, holders, then per queue: its signal list and its data lists
# in priority-step order. ARGV: 1 queues, 2 steps, 3 now, 4 ttl ms, 5 holder (this worker's
# liveness id, "" for none), 6.. per queue "1" to record as unacked ("0": consumed with
# no_ack). Pops the first message in kombu's BRPOP order (priority step first, then queue)
# and records it, and who holds it (workers.orphans), in the same script. Returns nil or
# {queue index, payload, recorded}. A payload it cannot read is returned unrecorded: the
# consumer then fails on it exactly as kombu does.
FETCH = """
local n, s, now = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local function base(i) return 3 + (i - 1) * (s + 1) end
local found, item, recorded = nil, nil, 0
for p = 1, s do
  for i = 1, n do
    item = redis.call('RPOP', KEYS[base(i) + 1 + p])
    if item then found = i break end
  end
  if found then break end
end
if found and ARGV[5 + found] == '1' then
  local ok, m = pcall(cjson.decode, item)
  local props = ok and type(m) == 'table' and m['properties']
  if type(props) == 'table' and type(props['delivery_tag']) == 'string'
      and type(props['delivery_info']) == 'table' then
    local info = props['delivery_info']
    local ex, rk = info['exchange'], info['routing_key']
    if type(ex) == 'string' and type(rk) == 'string' then
      local tag = props['delivery_tag']
      -- the payload's own JSON text, not a re-encoding: cjson would round numbers
      redis.call('HSET', KEYS[1], tag,
                 '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      redis.call('ZADD', KEYS[2], now, tag)
      if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], tag, ARGV[5]) end
      recorded = 1
    end
  end
end
for i = 1, n do
  local b, left = base(i), 0
  for p = 1, s do left = left + redis.call('LLEN', KEYS[b + 1 + p]) end
  if left == 0 then
    redis.call('DEL', KEYS[b + 1])
  elseif redis.call('LLEN', KEYS[b + 1]) == 0 then
    redis.call('LPUSH', KEYS[b + 1], '1')
    redis.call('PEXPIRE', KEYS[b + 1], ARGV[4])
  end
end
if not found then return nil end
return {found, item, recorded}
"""

TRANSPORT_PATH = f"{__name__}:Transport"  # Celery's broker_transport (workers.application)
# URLs shown for this transport (worker banner, "broker unreachable at ...") read redis://
kombu_connection.resolve_aliases.setdefault(TRANSPORT_PATH, "redis")

_prefixed = kombu_redis.GlobalKeyPrefixMixin
if "EVAL" in _prefixed.PREFIXED_SIMPLE_COMMANDS or "EVAL" in _prefixed.PREFIXED_COMPLEX_COMMANDS:
    raise ImportError("kombu now prefixes EVAL keys itself: workers.transport needs updating")


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a message the fetch script recorded is not recorded again."""

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # ack, reject and every restore: the holder record goes in the same pipeline
        return super()._remove_from_indices(delivery_tag, pipe).hdel(HOLDERS_KEY, delivery_tag)

    def append(self, message: Any, delivery_tag: str) -> None:
        if getattr(self.channel.connection, "recorded_tag", None) == delivery_tag:
            # unacked[tag] and unacked_index[tag] were written by FETCH, in kombu's format
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def _riders(self, delivery_tag: str) -> list[ack_writes.Rider]:
        message = self._delivered.get(delivery_tag) if ack_writes.waiting() else None
        if message is None:
            return []
        return ack_writes.take((message.headers or {}).get("id")
                               or message.properties.get("correlation_id"))

    def ack(self, delivery_tag: str) -> None:
        """kombu's ack; where a task's state writes wait for it (``workers.ack_writes``), its
        commands follow them on the task's line, in the same socket write, unanswered."""
        riders = self._riders(delivery_tag)
        if not riders:
            return super().ack(delivery_tag)
        ack = [("ZREM", self.unacked_index_key, delivery_tag),
               ("HDEL", self.unacked_key, delivery_tag), ("HDEL", HOLDERS_KEY, delivery_tag)]
        try:
            riders[0].send_with_ack(ack, [c for r in riders[1:] for c in r.commands])
        except OSError as exc:  # the line is down: the writes alone, then kombu's own ack
            log.warning("ack with the done mark not sent (%s); acking on its own", exc)
            for rider in riders:
                rider.send_otherwise()
            return super().ack(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        for rider in self._riders(delivery_tag):  # not an ack: they go on their own
            rider.send_otherwise()
        super().reject(delivery_tag, requeue)

    def restore_unacked(self, client: Any = None) -> Any:
        """kombu's restore (the channel closes with messages unacked); a finished task's
        writes waiting for an ack that will not come are sent first, so that its redelivery
        finds the done mark (and is acked as a duplicate) as it did before the ack carried it."""
        if ack_writes.waiting():
            for tag in list(self._delivered):
                for rider in self._riders(tag):
                    rider.send_otherwise()
        return super().restore_unacked(client)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; publishing, the BRPOP-driven fetch and restore's token differ."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._no_ack: dict[str, bool] = {}  # queue -> consumed without acks (latest consumer)
        self._shared_client: Any = None  # conn_or_acquire's client, for self.pool
        super().__init__(*args, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # After the connection is lost, Celery releases it while a task still in flight may
        # ack on this channel; stock kombu then fails with AttributeError (conninfo is None),
        # which Celery treats as unrecoverable and the worker exits. A connection error is
        # recoverable: the worker reconnects and the unacked message is redelivered later.
        if self.connection is None or self.connection.client is None:
            raise redis_errors.ConnectionError("the channel's broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, without a new redis-py client object per call (about 60 us each).

        kombu builds one for every publish, fetch, ack and restore; the client object holds no
        connection of its own (each command takes one from the channel's pool), so one per
        pool serves every thread. A new pool (after a disconnect or a fork) gets a new client;
        a closed channel still raises the ConnectionError of :meth:`_connparams`.
        """
        if client:
            yield client
            return
        pool = self.pool
        shared = self._shared_client
        if shared is None or shared.connection_pool is not pool:
            shared = self._shared_client = self._create_client()
        yield shared

    def _key(self, name: str) -> str:
        return f"{self.global_keyprefix}{name}"

    def signal_key(self, queue: str) -> str:
        """The full Redis key of ``queue``'s signal list (global_keyprefix included)."""
        return self._key(SIGNAL_PREFIX + queue)

    # -- publishing: the message and its token in one transaction ---------------------------
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if not self.ack_emulation:
            return super()._put(queue, message, **kwargs)
        ring = (RING, 1, self.signal_key(queue), SIGNAL_CAP, SIGNAL_TTL_MS)
        batch = kwargs.get("_publish_batch")
        if batch is not None:  # kombu buffers the LPUSH; the token joins the same batch
            super()._put(queue, message, **kwargs)
            batch.add("eval", *ring)
            return None
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.lpush(key, dumps(message))
            if self._expires and queue in self._expires:
                for step in self.priority_steps:
                    pipe.pexpire(self._q_for_pri(queue, step), self._expires[queue])
            pipe.eval(*ring)
            pipe.execute()
        return None

    # -- consuming --------------------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool = False, *args: Any, **kwargs: Any) -> Any:
        self._no_ack[queue] = bool(no_ack)
        if not no_ack and self.ack_emulation:
            ack_writes.consuming()  # this process acks what it runs (workers.ack_writes)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super()._basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack.pop(queue, None)
        return result

    def _brpop_start(self, timeout: float | None = None) -> None:
        """kombu's BRPOP on the hub socket, on the queues' signal lists instead of their data.

        The timeout is never 0 (block forever): its expiry is what finds untokened messages.
        """
        if not self.ack_emulation:
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        keys = [self.signal_key(q) for q in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        # keys are prefixed already: send them as they are, never via _prefix_args
        self.client.connection.send_command(
            "BRPOP", *keys, timeout or self.brpop_timeout or 1)
        return None

    def _brpop_read(self, **options: Any) -> bool:
        if not self.ack_emulation:
            return super()._brpop_read(**options)
        try:
            try:
                # the reply (a token, or nil on timeout) says only "look now"
                self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            fetched = self._fetch()
            if fetched is None:
                raise Empty()
            queue, payload, recorded = fetched
            self._queue_cycle.rotate(queue)
            # Only this message, only while it is handed over (synchronously, on this thread):
            # the QoS of whichever channel consumes ``queue`` then skips its own HSET + ZADD.
            transport = self.connection
            transport.recorded_tag = payload["properties"]["delivery_tag"] if recorded else None
            try:
                transport._deliver(payload, queue)
            finally:
                transport.recorded_tag = None
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _fetch(self) -> tuple[str, dict[str, Any], bool] | None:
        """Pop one message (kombu's priority order) and record it as unacked, atomically.

        Returns (queue, payload, whether the script recorded it as unacked), or None.
        """
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        keys = [self._key(self.unacked_key), self._key(self.unacked_index_key),
                self._key(HOLDERS_KEY)]
        for queue in queues:
            keys.append(self.signal_key(queue))
            keys.extend(self._key(self._q_for_pri(queue, step)) for step in self.priority_steps)
        argv = [len(queues), len(self.priority_steps), repr(time()), SIGNAL_TTL_MS,
                liveness.holder_id() or "", *("0" if self._no_ack.get(q) else "1" for q in queues)]
        with self.conn_or_acquire() as client:
            reply = client.eval(FETCH, len(keys), *keys, *argv)
        if not reply:
            return None
        index, item, recorded = reply
        return queues[int(index) - 1], loads(bytes_to_str(item)), bool(recorded)

    def _do_restore_message(self, payload: dict[str, Any], exchange: str, routing_key: str,
                            pipe: Any, leftmost: bool = False) -> None:
        """kombu's restore, plus a token for each queue it lands in (same transaction)."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        if not self.ack_emulation:
            return
        try:
            queues = self._lookup(exchange, routing_key)
        except Exception:  # kombu logged it (message not restored): nothing to ring
            return
        for queue in queues:
            pipe.eval(RING, 1, self.signal_key(queue), SIGNAL_CAP, SIGNAL_TTL_MS)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`'s reliable fetch."""

    Channel = Channel
    recorded_tag: str | None = None  # the message being handed over, recorded by FETCH


__all__ = ["FETCH", "HOLDERS_KEY", "RING", "RING_MANY", "SIGNAL_PREFIX", "TRANSPORT_PATH",
           "Channel", "QoS", "Transport"]
