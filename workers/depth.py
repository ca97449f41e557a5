"""Queue depth, read the same way from Redis, RabbitMQ and SQS.

Depth is Tidegate's backpressure signal (producers throttle on it) and its autoscaling signal
(the exporter publishes it). Each probe is exact where the broker allows and says ``None``
where it cannot know (never a guess dressed up as a number):

=========  ==================================  ==================  ======================
broker     ready                               in flight           oldest message age
=========  ==================================  ==================  ======================
Redis      LLEN of the list + priority lists   kombu ``unacked``   enqueue-time header at
           (``q`` and ``q<sep>3/6/9``)         hash, per queue     the tail (next to pop)
RabbitMQ   passive ``queue.declare``           management API      None (AMQP cannot peek)
SQS        ApproximateNumberOfMessages         ...NotVisible       None (not exposed)
=========  ==================================  ==================  ======================

:class:`SharedDepthCache` puts one reading per queue per TTL in Redis, so a hundred producers
cost the broker one probe per TTL, and estimates the drain rate (messages/s consumed) from a
shared publish counter and successive readings; Retry-After is computed from it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlsplit

from pydantic import SecretStr

from resilience.errors import ConfigError, TransientError
from workers import headers as h
from workers import unacked
from workers.settings import Settings
from workers.sqs_deferral import SqsClientConfig, sqs_client
from workers.topology import REDIS_PRIORITY_STEPS, REDIS_SEP, Topology

__all__ = [
    "DepthProbe",
    "DepthUnavailable",
    "QueueDepth",
    "RabbitMQDepthProbe",
    "RedisDepthProbe",
    "SQSDepthProbe",
    "SharedDepthCache",
    "flush_all",
    "probe_for",
    "sqs_queue_name",
]

log = logging.getLogger(__name__)


class DepthUnavailable(TransientError):
    """The broker could not be asked (unreachable, timed out, or the queue does not exist)."""


@dataclass(frozen=True)
class QueueDepth:
    """One reading of one queue. ``None`` means the broker cannot tell, not zero."""

    queue: str
    ready: int  # waiting to be delivered
    in_flight: int | None  # delivered to a consumer, not yet acked
    delayed: int | None  # published but not yet deliverable (SQS DelaySeconds)
    oldest_age_s: float | None  # age of the message that waits longest
    consumers: int | None
    source: str  # "redis", "rabbitmq", "rabbitmq+management", "sqs"
    measured_at: float  # epoch seconds
    # of in_flight, the retries a worker holds until their countdown ends (Redis; else None)
    held_retries: int | None = None

    @property
    def backlog(self) -> int:
        """What still has to be delivered: ready plus delayed where known."""
        return self.ready + (self.delayed or 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> QueueDepth:
        return cls(**json.loads(text))


@runtime_checkable
class DepthProbe(Protocol):
    """Reads one queue's depth from the broker; raises :class:`DepthUnavailable`."""

    def depth(self, queue: str) -> QueueDepth: ...


# -- Redis ---------------------------------------------------------------------------------


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


# -- RabbitMQ ------------------------------------------------------------------------------


class RabbitMQDepthProbe:
    """Ready and consumers from a passive ``queue.declare``; unacked from the management API.

    The passive declare is exact and cheap but knows nothing of unacked messages; the
    management API does (``messages_unacknowledged``) but its figures lag by its collection
    interval (5 s by default). Without the management plugin ``in_flight`` is None.
    AMQP offers no way to read a message without taking it, so the oldest age is None.
    """

    source = "rabbitmq"

    def __init__(
        self,
        url: str,
        *,
        management_url: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.management_url = management_url.rstrip("/") if management_url else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.clock = clock
        self._conn: Any = None
        self._lock = threading.Lock()
        # "amqp://h1//;amqp://h2//": kombu fails over along the list; vhost and login are the
        # first URL's (one cluster: the same on every node)
        parts = urlsplit(url.split(";")[0])
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        self._management_down_until = 0.0
        self._http: Any = None  # one keep-alive client: a new one costs ~30 ms (SSL context)

    def _channel(self) -> Any:
        from kombu import Connection

        if self._conn is None:
            self._conn = Connection(self.url, connect_timeout=self.connect_timeout,
                                    transport_options={"read_timeout": self.read_timeout,
                                                       "write_timeout": self.read_timeout})
            self._conn.ensure_connection(max_retries=1, timeout=self.connect_timeout)
        return self._conn.default_channel

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = None

    def depth(self, queue: str) -> QueueDepth:
        from amqp.exceptions import NotFound

        with self._lock:
            try:
                _, ready, consumers = self._channel().queue_declare(queue=queue, passive=True)
            except NotFound:
                self._reset()
                raise DepthUnavailable(f"rabbitmq: no queue {queue!r} in vhost "
                                       f"{self.vhost!r}") from None
            except Exception as exc:  # socket, connection closed, timeout: all transient
                self._reset()
                raise DepthUnavailable(f"rabbitmq depth probe failed: {exc}") from None
        in_flight, source = self._unacked(queue), self.source
        if in_flight is not None:
            source = "rabbitmq+management"
        return QueueDepth(queue, int(ready), in_flight, None, None, int(consumers), source,
                          self.clock())

    def _unacked(self, queue: str) -> int | None:
        if not self.management_url or self.clock() < self._management_down_until:
            return None
        import httpx

        url = (f"{self.management_url}/api/queues/{quote(self.vhost, safe='')}/"
               f"{quote(queue, safe='')}")
        if self._http is None:
            self._http = httpx.Client(auth=self._auth, timeout=httpx.Timeout(
                self.read_timeout, connect=self.connect_timeout))
        try:
            response = self._http.get(url)
            response.raise_for_status()
            return int(response.json().get("messages_unacknowledged", 0))
        except (httpx.HTTPError, ValueError, TypeError) as exc:
            # Not enabled or not reachable: ask again in a minute, not on every probe.
            log.debug("rabbitmq management API unavailable at %s: %s", self.management_url, exc)
            self._management_down_until = self.clock() + 60
            return None

    def close(self) -> None:
        with self._lock:
            self._reset()
            if self._http is not None:
                self._http.close()
                self._http = None


# -- SQS -----------------------------------------------------------------------------------


def sqs_queue_name(queue: str, prefix: str = "") -> str:
    """The SQS queue name kombu uses for a Celery queue (dots become dashes, bar ``.fifo``)."""
    if queue.endswith(".fifo"):
        return prefix + queue[:-5].replace(".", "-") + ".fifo"
    return prefix + queue.replace(".", "-")


class SQSDepthProbe:
    """SQS's approximate counters (eventually consistent, by AWS's own description).

    ``oldest_age_s`` is None: SQS publishes ApproximateAgeOfOldestMessage only as a CloudWatch
    metric, not as a queue attribute (and moto has no CloudWatch feed for it).
    """

    source = "sqs"
    ATTRIBUTES = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                  "ApproximateNumberOfMessagesDelayed")

    def __init__(self, client: Any, *, prefix: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self._urls: dict[str, str] = {}

    def _url(self, queue: str) -> str:
        if queue not in self._urls:
            name = sqs_queue_name(queue, self.prefix)
            self._urls[queue] = self.client.get_queue_url(QueueName=name)["QueueUrl"]
        return self._urls[queue]

    def depth(self, queue: str) -> QueueDepth:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            attrs = self.client.get_queue_attributes(
                QueueUrl=self._url(queue), AttributeNames=list(self.ATTRIBUTES))["Attributes"]
        except ClientError as exc:
            self._urls.pop(queue, None)
            code = exc.response.get("Error", {}).get("Code", "")
            if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
                raise DepthUnavailable(f"sqs: no queue {sqs_queue_name(queue, self.prefix)!r}"
                                       ) from None
            raise DepthUnavailable(f"sqs depth probe failed: {exc}") from None
        except BotoCoreError as exc:
            raise DepthUnavailable(f"sqs depth probe failed: {exc}") from None
        return QueueDepth(queue, int(attrs.get(self.ATTRIBUTES[0], 0)),
                          int(attrs.get(self.ATTRIBUTES[1], 0)),
                          int(attrs.get(self.ATTRIBUTES[2], 0)), None, None, self.source,
                          self.clock())


def broker_sqs_config(settings: Settings) -> SqsClientConfig:
    """How to reach the SQS broker: credentials and endpoint from the settings or, as kombu
    reads them, from ``sqs://KEY:SECRET@host:port/``; bounded timeouts, two attempts."""
    parts = urlsplit(settings.broker_url)
    key, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    if key is None and parts.username:  # sqs://KEY:SECRET@host/ as kombu reads it
        key = SecretStr(unquote(parts.username))
        secret = SecretStr(unquote(parts.password or ""))
    endpoint = settings.sqs_endpoint_url
    if endpoint is None and parts.hostname and parts.hostname != "localhost" and parts.port:
        endpoint = f"http://{parts.hostname}:{parts.port}"
    return SqsClientConfig(
        endpoint_url=endpoint,
        region=settings.sqs_region,
        access_key_id=key.get_secret_value() if key else None,
        secret_access_key=secret.get_secret_value() if secret else None,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        max_attempts=2,
    )


def probe_for(settings: Settings, topology: Topology | None = None) -> DepthProbe:
    """The probe for the configured broker (by the scheme of ``TIDEGATE_BROKER_URL``)."""
    transport = settings.transport
    if transport == "redis":
        from resilience.stores import redis_client

        client = redis_client(settings.broker_url, socket_timeout=settings.read_timeout_s,
                              socket_connect_timeout=settings.connect_timeout_s)
        return RedisDepthProbe(client)
    if transport == "amqp":
        return RabbitMQDepthProbe(settings.broker_url,
                                  management_url=settings.rabbitmq_management_url,
                                  connect_timeout=settings.connect_timeout_s,
                                  read_timeout=settings.read_timeout_s)
    if transport == "sqs":
        return SQSDepthProbe(sqs_client(broker_sqs_config(settings)),
                             prefix=settings.sqs_queue_prefix)
    raise ConfigError(f"no depth probe for the {transport!r} transport")


# -- the shared cache and the drain rate ---------------------------------------------------

_REFRESH_LUA = """
-- KEYS: reading, samples, lock ; ARGV: reading json, ttl ms, sample json, keep, window s, now
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3])  -- the refresh lock: the reading's age now decides
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5]) * 4))
return redis.call('LRANGE', KEYS[2], 0, -1)
"""


@dataclass(frozen=True)
class DepthEstimate:
    """A (possibly cached) reading plus what Tidegate producers published since it."""

    reading: QueueDepth
    published_since: int
    drain_rate: float | None  # messages/s taken off the queue; None until two readings

    @property
    def backlog(self) -> int:
        return self.reading.backlog + self.published_since


class SharedDepthCache:
    """One broker probe per queue per ``ttl_s`` across every process that shares Redis.

    The first caller after expiry takes a ``SET NX`` lock and probes; the others read the
    cached reading (or the stale one while the probe runs). A failing probe keeps the lock
    until it expires, so a broken broker is not asked by every process at once. Producers
    count what they publish (:meth:`record_published`), so :meth:`estimate` is
    ``reading + published since`` and a flood cannot overshoot by a TTL's worth of messages.
    Each refresh stores a sample ``(time, published counter, backlog)``; the drain rate over
    ``window_s`` is ``(published delta - backlog delta) / elapsed``, at least the fall in
    backlog.
    If Redis is down, every process probes for itself (depth stays available).

    The publish path pays no Redis round trip of its own: publishes are counted locally and
    merged into the shared counter every ``flush_s`` (by a background thread, so an idle
    producer's last counts still arrive), and an estimate younger than ``reuse_s`` is reused
    with this process's own publishes added. Another process's publishes are therefore seen
    within ``flush_s + reuse_s`` (0.1 s by default) — well inside one depth TTL. The price: a
    reading taken while other processes hold unflushed counts counts those messages twice until
    the next reading (at most ``flush_s`` of their publishing), so the throttle errs early.
    """

    def __init__(
        self,
        probe: DepthProbe,
        redis_client: Any,
        *,
        ttl_s: float = 0.25,
        window_s: float = 10.0,
        prefix: str = "tidegate:depth",
        clock: Callable[[], float] = time.time,
        flush_s: float = 0.05,
        reuse_s: float = 0.05,
    ) -> None:
        if not ttl_s > 0 or not window_s > ttl_s:
            raise ConfigError("depth cache needs ttl_s > 0 and window_s > ttl_s")
        if not 0 < flush_s <= ttl_s or not 0 <= reuse_s <= ttl_s:
            raise ConfigError("depth cache needs 0 < flush_s <= ttl_s and 0 <= reuse_s <= ttl_s")
        self.flush_s, self.reuse_s = flush_s, reuse_s
        self._lock = threading.Lock()
        # Held across a flush's swap and INCRBY: estimate() flushes first, and must not read
        # the counter while a batch taken by the background thread is still on its way (the
        # probe would already see those messages and they would be counted twice).
        self._flush_lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._published_here: dict[str, int] = {}
        self._recent: dict[str, tuple[DepthEstimate, float, int]] = {}
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self.probe = probe
        self.redis = redis_client
        self.ttl_s = ttl_s
        self.window_s = window_s
        self.prefix = prefix
        self.clock = clock
        self._refresh = redis_client.register_script(_REFRESH_LUA)
        self._local: dict[str, tuple[QueueDepth, float | None]] = {}
        _LIVE_CACHES.add(self)

    def _key(self, queue: str, what: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{what}"

    def record_published(self, queue: str, count: int = 1) -> None:
        """Count messages this process published to ``queue`` (no Redis call; never raises)."""
        with self._lock:
            self._pending[queue] = self._pending.get(queue, 0) + count
            self._published_here[queue] = self._published_here.get(queue, 0) + count
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                                 name="tidegate-depth-flush")
                self._flusher.start()
        self._wake.set()

    def flush(self) -> None:
        """Merge the locally counted publishes into the shared counters now (best effort)."""
        import redis

        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            pending = {q: n for q, n in pending.items() if n}
            if not pending:
                return
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for queue, n in pending.items():
                        pipe.incrby(self._key(queue, "published"), n)
                    pipe.execute()
            except (redis.RedisError, OSError):
                with self._lock:  # keep them for the next try: the counter only ever grows
                    for queue, n in pending.items():
                        self._pending[queue] = self._pending.get(queue, 0) + n

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.flush_s)  # gather a batch, then merge it
            self.flush()

    def depth(self, queue: str) -> QueueDepth:
        """The freshest shared reading (at most ``ttl_s`` old unless the probe is failing)."""
        return self.estimate(queue).reading

    def estimate(self, queue: str) -> DepthEstimate:
        """Reading + what was published since + drain rate (reused for ``reuse_s``)."""
        now = self.clock()
        with self._lock:
            recent = self._recent.get(queue)
            here = self._published_here.get(queue, 0)
        if recent is not None and now - recent[1] < self.reuse_s:
            est, _, here_then = recent
            return dataclasses.replace(est, published_since=est.published_since + here
                                       - here_then)
        self.flush()  # our own publishes belong in the shared counter before we read it
        est = self._shared_estimate(queue)
        with self._lock:
            self._recent[queue] = (est, now, here)
        return est

    def peek(self, queue: str) -> tuple[DepthEstimate, float] | None:
        """The last estimate with this process's publishes since added, and its age in
        seconds; no I/O (None before the first :meth:`estimate`). For callers that must not
        block, such as an event loop, while something else keeps the estimate fresh."""
        with self._lock:
            recent = self._recent.get(queue)
            here = self._published_here.get(queue, 0)
        if recent is None:
            return None
        est, at, here_then = recent
        return (dataclasses.replace(est, published_since=est.published_since + here - here_then),
                max(0.0, self.clock() - at))

    def _shared_estimate(self, queue: str) -> DepthEstimate:
        """Reading + what was published since + drain rate, in one Redis round trip."""
        import redis

        try:
            raw, published, drain = self.redis.mget(
                self._key(queue, "reading"), self._key(queue, "published"),
                self._key(queue, "drain"))
        except (redis.RedisError, OSError):
            return self._local_estimate(queue)
        published = int(published or 0)
        reading = _parse(raw)
        if reading is None or self.clock() - reading[0].measured_at >= self.ttl_s:
            fresh = self._maybe_refresh(queue, published)
            if fresh is not None:
                return fresh
            if reading is None:  # another process is probing and nothing is cached yet
                return self._direct(queue, published)
        depth, published_at = reading
        return DepthEstimate(depth, max(0, published - published_at),
                             float(drain) if drain is not None else None)

    def drain_rate(self, queue: str) -> float | None:
        """Messages/s consumed from ``queue`` lately (None until two readings exist)."""
        return self.estimate(queue).drain_rate

    def _maybe_refresh(self, queue: str, published: int) -> DepthEstimate | None:
        import redis

        ttl_ms = max(1, int(self.ttl_s * 1000))
        try:
            if not self.redis.set(self._key(queue, "lock"), b"1", nx=True, px=ttl_ms):
                return None
        except (redis.RedisError, OSError):
            return self._local_estimate(queue)
        return self._direct(queue, published)

    def _direct(self, queue: str, published: int) -> DepthEstimate:
        import redis

        depth = self.probe.depth(queue)
        sample = json.dumps([depth.measured_at, published, depth.backlog])
        try:
            samples = self._refresh(
                keys=[self._key(queue, "reading"), self._key(queue, "samples"),
                      self._key(queue, "lock")],
                args=[json.dumps([json.loads(depth.to_json()), published]),
                      int(self.window_s * 4000), sample, 64, self.window_s, depth.measured_at])
            drain = drain_from_samples([json.loads(s) for s in samples], self.window_s)
            if drain is not None:
                self.redis.set(self._key(queue, "drain"), repr(drain),
                               px=int(self.window_s * 4000))
            else:
                cached = self.redis.get(self._key(queue, "drain"))
                drain = float(cached) if cached is not None else None
        except (redis.RedisError, OSError, ValueError):
            drain = None
        return DepthEstimate(depth, 0, drain)

    def _local_estimate(self, queue: str) -> DepthEstimate:
        """Redis is down: probe at most once per TTL in this process."""
        cached = self._local.get(queue)
        now = self.clock()
        if cached is None or now - cached[0].measured_at >= self.ttl_s:
            depth = self.probe.depth(queue)
            drain = None
            if cached is not None and depth.measured_at > cached[0].measured_at:
                drain = max(0.0, (cached[0].backlog - depth.backlog)
                            / (depth.measured_at - cached[0].measured_at)) or cached[1]
            self._local[queue] = cached = (depth, drain)
        return DepthEstimate(cached[0], 0, cached[1])


_LIVE_CACHES: weakref.WeakSet[SharedDepthCache] = weakref.WeakSet()


def flush_all() -> None:
    """Merge every live cache's unflushed publish counts into the shared counters now.

    Runs at interpreter exit (the flusher is a daemon thread: without this a producer's last
    ``flush_s`` of publishes would never reach the counter the drain rate is computed from),
    and lets a test settle every cache before it empties the shared database: a count that
    lands afterwards would be read as messages published since the next reading.
    """
    for cache in list(_LIVE_CACHES):
        cache.flush()


atexit.register(flush_all)


def _parse(raw: bytes | None) -> tuple[QueueDepth, int] | None:
    if raw is None:
        return None
    try:
        fields, published = json.loads(raw)
        return QueueDepth(**fields), int(published)
    except (ValueError, TypeError):
        return None


def drain_from_samples(samples: list[list[float]], window_s: float) -> float | None:
    """Drain rate from ``[time, published counter, backlog]`` samples, newest first.

    consumed = published delta - backlog delta; at least the fall in backlog (publishers
    that do not count, e.g. plain ``apply_async``, make the first figure an underestimate).
    """
    if len(samples) < 2:
        return None
    newest = samples[0]
    oldest = None
    for s in samples[1:]:
        if newest[0] - s[0] > window_s:
            break
        oldest = s
    if oldest is None or newest[0] <= oldest[0]:
        return None
    elapsed = newest[0] - oldest[0]
    consumed = (newest[1] - oldest[1]) - (newest[2] - oldest[2])
    rate = max(consumed, oldest[2] - newest[2], 0) / elapsed
    return rate if math.isfinite(rate) else None
