"""Redis (``redis://``, ``rediss://``, ``sentinel://``): kombu's Redis transport, with
Tidegate's reliable fetch (:mod:`workers.transport`) unless it is turned off.

What differs here: priorities are kombu's sub-lists (0 pops first), ready depth is exact
(``LLEN`` of each sub-list, the oldest message's enqueue time at a list's tail), delivered
messages sit in kombu's ``unacked`` hash, a dead-letter queue is a plain list, and worker
heartbeats live in the broker's own Redis.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from resilience.shedding import Priority
from workers import headers as h
from workers import unacked
from workers.brokers.base import BrokerAdapter
from workers.depth import DepthUnavailable, QueueDepth
from workers.topology import REDIS_PRIORITY_STEPS, REDIS_SEP

if TYPE_CHECKING:
    from workers.deadletter import DeadLetter, DeadLetters
    from workers.settings import Settings

__all__ = ["RedisBroker", "RedisDepthProbe"]


class RedisBroker(BrokerAdapter):
    name = "redis"
    schemes = ("redis", "rediss", "sentinel")
    # kombu's Redis transport pops priority 0 first (sub-lists "<queue>\x06\x16<n>" for
    # 3, 6, 9): CRITICAL must be the lowest number to jump the queue.
    priorities: ClassVar = {Priority.CRITICAL: 0, Priority.HIGH: 3, Priority.MEDIUM: 6,
                            Priority.LOW: 9}
    flags_redelivery = True
    heartbeats_in_broker = True
    batch_publish = "multi_exec"

    def kombu_url(self, url: str) -> str:
        """A Sentinel URL without ``?master_name=`` (that goes in the transport options;
        kombu refuses the key when it switches between the URL's parts)."""
        if not url.startswith("sentinel://"):
            return url
        from workers.sentinel_transport import kombu_url

        return kombu_url(url)

    def transport_options(self, settings: Settings) -> dict[str, Any]:
        connect, read = settings.connect_timeout_s, settings.read_timeout_s
        return {
            # The visibility timeout must exceed the longest task's hard limit, or Redis
            # redelivers a task that is still running (Settings.check enforces it).
            "visibility_timeout": settings.visibility_timeout_s,
            # How soon a killed worker's unacked tasks come back: kombu sweeps every
            # interval x throttle seconds (100 s by default); keep it a fraction of the
            # visibility timeout so a short timeout is not stretched by the sweep.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1 if settings.visibility_timeout_s < 600 else 10,
            # kombu's own priority layout and separator (REDIS_SEP), nothing else: stock
            # clients (Flower, `celery --broker=URL inspect`, bare producers) assume them.
            "priority_steps": list(REDIS_PRIORITY_STEPS),
            "queue_order_strategy": "priority",
            "socket_connect_timeout": connect,
            "socket_timeout": read + 5,  # above the BRPOP timeout (1 s) so polls do not trip it
            "retry_on_timeout": False,
            "health_check_interval": 25,
            **_sentinel_options(settings),
        }

    def celery_conf(self, settings: Settings) -> dict[str, Any]:
        """Tidegate's Redis transport (see ``workers.transport``) unless the reliable fetch
        is off.

        ``broker_transport`` wins over the URL's scheme in kombu's ``Connection``. kombu turns
        TLS on for a ``rediss://`` URL only when the transport is named ``rediss``, so without
        ``ssl_*`` options in the URL this keeps kombu's own default for that scheme.
        """
        if not settings.redis_reliable_fetch:
            return {}
        from workers.transport import TRANSPORT_PATH

        conf: dict[str, Any] = {"broker_transport": TRANSPORT_PATH}
        if settings.broker_url.startswith("sentinel://"):  # docs/ha.md
            from workers.sentinel_transport import SENTINEL_TRANSPORT_PATH

            conf["broker_transport"] = SENTINEL_TRANSPORT_PATH
        parts = urlsplit(settings.broker_url)
        if parts.scheme == "rediss" and "ssl_" not in parts.query:
            conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_NONE}  # kombu's rediss default
        return conf

    def status_dbs(self, settings: Settings, client: Any) -> tuple[int, int] | None:
        """Same plain ``redis://`` host, port and credentials, with the reliable-fetch
        transport (its publish-batch hook); a name that differs (``localhost`` vs
        ``127.0.0.1``) counts as another server. (The Producer also requires no
        ``global_keyprefix``: kombu's client would prefix the status key too.)"""
        from urllib.parse import unquote

        pool = getattr(client, "connection_pool", None)
        broker = urlsplit(settings.broker_url)
        if pool is None or broker.scheme != "redis" or not settings.redis_reliable_fetch:
            return None
        kw = pool.connection_kwargs
        if "path" in kw or kw.get("ssl"):
            return None
        try:
            broker_db = int(broker.path.lstrip("/") or 0)
            port = broker.port or 6379
        except ValueError:
            return None
        same = ((kw.get("host"), kw.get("port")) == (broker.hostname or "localhost", port)
                and kw.get("username") == (unquote(broker.username) if broker.username
                                           else None)
                and kw.get("password") == (unquote(broker.password) if broker.password
                                           else None))
        return (int(kw.get("db") or 0), broker_db) if same else None

    def client(self, settings: Settings, *, timeout_s: float | None = None) -> Any:
        """A client of the broker's own Redis (not the state store); ``sentinel://`` too."""
        from resilience.stores import redis_client

        return redis_client(settings.broker_url,
                            socket_timeout=timeout_s or settings.read_timeout_s,
                            socket_connect_timeout=timeout_s or settings.connect_timeout_s)

    def depth_probe(self, settings: Settings) -> RedisDepthProbe:
        return RedisDepthProbe(self.client(settings))

    def sweeps_orphans(self, settings: Settings) -> bool:
        # the reliable fetch records who holds each message: a dead holder's are swept back
        return settings.redis_reliable_fetch

    # A DLQ is kombu's plain list (LPUSHed: the oldest record at the tail), read in place.
    def dead_letters(self, dls: DeadLetters, queue: str, limit: int | None) -> list[DeadLetter]:
        from workers.deadletter import parse_envelope

        dlq = dls.topology.dead_letter_queue(queue)
        out: list[DeadLetter] = []
        for raw in reversed(self.client(dls.settings).lrange(dlq, 0, -1)):
            out.append(parse_envelope(json.loads(raw), dlq))
            if limit and len(out) >= limit:
                break
        return out

    def take_dead_letters(self, dls: DeadLetters, queue: str,
                          select: Callable[[DeadLetter], bool],
                          handle: Callable[[DeadLetter], None]) -> Iterator[DeadLetter]:
        from workers.deadletter import parse_envelope

        dlq = dls.topology.dead_letter_queue(queue)
        client = self.client(dls.settings)
        for raw in reversed(client.lrange(dlq, 0, -1)):
            record = parse_envelope(json.loads(raw), dlq)
            if select(record):
                handle(record)
                client.lrem(dlq, 1, raw)
                yield record


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    if not settings.broker_url.startswith("sentinel://"):
        return {}
    from workers.sentinel_transport import sentinel_transport_options

    return sentinel_transport_options(settings.broker_url, settings.connect_timeout_s,
                                      wait_replicas=settings.redis_wait_replicas,
                                      wait_timeout_ms=settings.redis_wait_timeout_ms)


class RedisDepthProbe:
    """Exact depth on kombu's Redis transport.

    kombu LPUSHes and BRPOPs, so the tail of each list is the next message out and the oldest
    in that list; the oldest of the tails is the queue's oldest message. Delivered-but-unacked
    messages sit in the ``unacked`` hash as ``[message, exchange, routing_key]``; Celery
    publishes to the queue's name as routing key, which is how they are told apart.
    ETA/countdown tasks are held (unacked) by the worker that reserved them: counted in flight,
    and apart as ``held_retries`` (the status page shows them as retries waiting).
    """

    source = "redis"

    def __init__(
        self,
        client: Any,
        *,
        sep: str = REDIS_SEP,
        priority_steps: Iterable[int] = REDIS_PRIORITY_STEPS,
        unacked_key: str = "unacked",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.sep = sep
        self.steps = tuple(sorted(set(priority_steps)))
        self.unacked_key = unacked_key
        self.clock = clock

    def lists(self, queue: str) -> list[str]:
        """The Redis keys that hold ``queue``'s ready messages (one per priority step)."""
        return [queue if step == 0 else f"{queue}{self.sep}{step}" for step in self.steps]

    def depth(self, queue: str) -> QueueDepth:
        return self.depths([queue])[queue]

    def depths(self, queues: Iterable[str]) -> dict[str, QueueDepth]:
        """Several queues with one pipeline and one pass over the unacked hash."""
        import redis

        queues = list(queues)
        try:
            pipe = self.client.pipeline(transaction=False)
            for q in queues:
                for key in self.lists(q):
                    pipe.llen(key)
                    pipe.lindex(key, -1)
            raw = pipe.execute()
            in_flight, held = self._in_flight(set(queues))
        except (redis.RedisError, OSError) as exc:
            raise DepthUnavailable(f"redis depth probe failed: {exc}") from None
        now = self.clock()
        out: dict[str, QueueDepth] = {}
        per_queue = 2 * len(self.steps)
        for i, q in enumerate(queues):
            chunk = raw[i * per_queue:(i + 1) * per_queue]
            ready = sum(int(n) for n in chunk[0::2])
            ages = [a for a in (_enqueued_at(t) for t in chunk[1::2]) if a is not None]
            oldest = max(0.0, now - min(ages)) if ages else None
            out[q] = QueueDepth(q, ready, in_flight.get(q, 0), None, oldest, None,
                                self.source, now, held.get(q, 0))
        return out

    def _in_flight(self, queues: set[str]) -> tuple[dict[str, int], dict[str, int]]:
        return unacked.split_per_queue(
            (value for _, value in self.client.hscan_iter(self.unacked_key, count=500)), queues,
            self.clock())


def _enqueued_at(raw: bytes | str | None) -> float | None:
    """The producer's enqueue time from a kombu Redis message (None if absent/unreadable)."""
    if not raw:
        return None
    try:
        message = json.loads(raw)
        value = (message.get("headers") or {}).get(h.ENQUEUED_AT)
        return float(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None

