"""RabbitMQ (``amqp://``, ``amqps://``, ``pyamqp://``): kombu's py-amqp transport.

What differs here: priorities count up (9 is delivered first, classic queues declared with
``x-max-priority``; quorum queues have none: ``Topology.queue_arguments``), publishes are
confirmed and ``mandatory``, a rejected message dead-letters natively into its DLQ
(``x-dead-letter-exchange``), the ready depth comes from a passive ``queue.declare`` and the
unacked count from the management API.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

from resilience.shedding import Priority
from workers.brokers.base import BrokerAdapter
from workers.depth import DepthUnavailable, QueueDepth

if TYPE_CHECKING:
    from workers.settings import Settings

__all__ = ["RabbitMQBroker", "RabbitMQDepthProbe"]

log = logging.getLogger(__name__)


class RabbitMQBroker(BrokerAdapter):
    name = "amqp"
    schemes = ("amqp", "amqps", "pyamqp")
    # RabbitMQ delivers the highest number first (up to x-max-priority, AMQP_MAX_PRIORITY)
    priorities: ClassVar = {Priority.CRITICAL: 9, Priority.HIGH: 6, Priority.MEDIUM: 3,
                            Priority.LOW: 0}
    flags_redelivery = True
    dead_letters_natively = True
    batch_publish = "confirms"

    def transport_options(self, settings: Settings) -> dict[str, Any]:
        # Publisher confirms: a publish returns only once the broker has the message.
        read = settings.read_timeout_s
        return {"confirm_publish": True, "connect_timeout": settings.connect_timeout_s,
                "read_timeout": read, "write_timeout": read}

    def publish_options(self, settings: Settings) -> dict[str, Any]:
        # mandatory: a message that no queue would take comes back as an error instead of
        # vanishing (kombu caches declarations per connection, so a queue deleted behind its
        # back would otherwise swallow every publish). timeout/confirm_timeout: a broker under
        # flow control blocks writes and withholds confirms; we give up instead of hanging.
        t = settings.publish_timeout_s
        return {"mandatory": True, "timeout": t, "confirm_timeout": t}

    def unroutable(self, exc: BaseException) -> bool:
        """py-amqp's error for a mandatory message that no queue took (reply code 312)."""
        return getattr(exc, "reply_code", None) == 312 or getattr(exc, "code", None) == 312

    def refused_publish(self, exc: BaseException) -> bool:
        """Unroutable, or any channel/connection error py-amqp raised for the publish."""
        return self.unroutable(exc) or type(exc).__module__.startswith("amqp")

    def depth_probe(self, settings: Settings) -> RabbitMQDepthProbe:
        return RabbitMQDepthProbe(settings.broker_url,
                                  management_url=settings.rabbitmq_management_url,
                                  connect_timeout=settings.connect_timeout_s,
                                  read_timeout=settings.read_timeout_s)


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
        missing_ttl_s: float = 1.0,
    ) -> None:
        self.url = url
        self.management_url = management_url.rstrip("/") if management_url else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.clock = clock
        self._conn: Any = None
        self._chan: Any = None
        self._lock = threading.Lock()
        # A queue not declared yet (no worker, nothing published) is probed again only after
        # this long: the API's state refresher asks for every work queue 20 times a second.
        self.missing_ttl_s = missing_ttl_s
        self._missing: dict[str, float] = {}  # queue -> monotonic time its miss is forgotten
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
        if self._chan is None:
            self._chan = self._conn.channel()
        return self._chan

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = self._chan = None

    def depth(self, queue: str) -> QueueDepth:
        from amqp.exceptions import NotFound

        with self._lock:
            if time.monotonic() < self._missing.get(queue, 0.0):
                raise DepthUnavailable(f"rabbitmq: no queue {queue!r} in vhost {self.vhost!r} "
                                       f"(seen missing under {self.missing_ttl_s:g} s ago)")
            try:
                _, ready, consumers = self._channel().queue_declare(queue=queue, passive=True)
            except NotFound:
                # The broker closed the channel, not the connection: the next probe opens a
                # channel (one round trip), not a connection (a handshake and a login).
                self._chan = None
                self._missing[queue] = time.monotonic() + self.missing_ttl_s
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

