"""Tidegate's reliable-fetch Redis transport on kombu's Sentinel transport.

``TIDEGATE_BROKER_URL=sentinel://host:port;sentinel://host:port;...?master_name=NAME``: kombu's
``SentinelChannel`` finds the master through the sentinels for every new connection pool;
:class:`workers.transport.Channel` keeps its fetch (pop + unacked record in one script),
publish-with-token and restore. Combined by inheritance, Tidegate's channel first, so its
overrides run and hand on to kombu's Sentinel channel, then to kombu's Redis channel.

After a failover the worker's connection to the old master fails; Celery reconnects (a new
pool, so a new ``master_for`` lookup) and consumes from the promoted replica. What the old
master had acknowledged but not yet replicated is lost: docs/ha.md.
"""

from __future__ import annotations

from typing import Any

from kombu import connection as kombu_connection
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from resilience.redis_sentinel import parse_sentinel_url
from workers import transport

__all__ = ["SENTINEL_TRANSPORT_PATH", "SentinelChannel", "SentinelTransport", "kombu_url",
           "sentinel_transport_options"]

SENTINEL_TRANSPORT_PATH = f"{__name__}:SentinelTransport"
kombu_connection.resolve_aliases.setdefault(SENTINEL_TRANSPORT_PATH, "sentinel")


class SentinelChannel(transport.Channel, kombu_redis.SentinelChannel):
    """Reliable fetch on a master found through Sentinel; optionally, publishes that wait for
    replicas (``wait_replicas``)."""

    QoS = transport.QoS
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options,
                              "wait_replicas", "wait_timeout_ms")
    wait_replicas = 0  # 0: Redis' asynchronous replication (a failover may lose the newest)
    wait_timeout_ms = 1000

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """With ``wait_replicas``: the message and its token in MULTI/EXEC, then ``WAIT`` on
        the same connection; fewer replicas than asked within the timeout is a refused
        publish (the message may still be delivered: at least once, never lost silently)."""
        if not self.wait_replicas or not self.ack_emulation or kwargs.get("_publish_batch"):
            return super()._put(queue, message, **kwargs)
        key = self._key(self._q_for_pri(queue, self._get_message_priority(message,
                                                                          reverse=False)))
        commands: list[tuple[Any, ...]] = [("MULTI",), ("LPUSH", key, dumps(message))]
        if self._expires and queue in self._expires:
            commands += [("PEXPIRE", self._key(self._q_for_pri(queue, step)),
                          self._expires[queue]) for step in self.priority_steps]
        commands += [("EVAL", transport.RING, 1, self.signal_key(queue), transport.SIGNAL_CAP,
                      transport.SIGNAL_TTL_MS), ("EXEC",),
                     ("WAIT", self.wait_replicas, self.wait_timeout_ms)]
        with self.conn_or_acquire() as client:
            pool = client.connection_pool
            conn = pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_commands(commands))
                replies = [conn.read_response() for _ in commands]
            except BaseException:
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        if int(replies[-1]) < self.wait_replicas:
            raise OperationalError(
                f"publish to {queue!r} reached {int(replies[-1])} of {self.wait_replicas} "
                f"replicas within {self.wait_timeout_ms} ms")
        return None


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
    recorded_tag: str | None = None  # see workers.transport.Transport


def sentinel_transport_options(url: str, connect_timeout_s: float, *, wait_replicas: int = 0,
                               wait_timeout_ms: int = 1000) -> dict[str, Any]:
    """kombu's Sentinel options from the URL (the master's name), bounded sentinel sockets,
    and the publish-side ``WAIT``."""
    target = parse_sentinel_url(url)
    return {"master_name": target.master,
            "sentinel_kwargs": {"socket_timeout": connect_timeout_s,
                                "socket_connect_timeout": connect_timeout_s},
            "wait_replicas": wait_replicas, "wait_timeout_ms": wait_timeout_ms}


def kombu_url(url: str) -> str:
    """The URL without ``?master_name=``: kombu takes each ``;`` part as a failover
    alternative and refuses an unknown query key when it switches to that part."""
    return ";".join(part.split("?", 1)[0] for part in url.split(";"))
