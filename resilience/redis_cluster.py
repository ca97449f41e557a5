"""Shared state on a Redis Cluster: a redis-py ``RedisCluster`` from a ``redis-cluster://`` URL.

Every key Tidegate's scripts touch carries a hash tag (``{tidegate:breaker:payments}:state``,
``tidegate:depth:{payments}:...``), so each script and each transaction lands in one slot and
the cluster can spread dependencies over its masters. A master that fails is replaced by its
replica (the cluster's own failover); redis-py learns the new owner from the ``MOVED`` replies
and connection errors, and until then :class:`~resilience.stores.RedisStore` answers from
its local fallback, as for any unreachable store.

URL: ``redis-cluster://[[user]:password@]host:port[,host:port...][/0]`` (``rediss-cluster://``
for TLS). One reachable node is enough to discover the rest; list several so start-up
survives one being down. A cluster has one database, so only ``/0`` (or none) is accepted.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from resilience.errors import ConfigError

__all__ = ["CLUSTER_SCHEMES", "LazyCluster", "cluster_client", "is_cluster_url",
           "parse_cluster_url"]

CLUSTER_SCHEMES = ("redis-cluster", "rediss-cluster")


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``(nodes, connection kwargs)`` of a cluster URL; a ConfigError names what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ConfigError(f"not a Redis Cluster URL (redis-cluster://host:port,...): {scheme!r}")
    rest = rest.split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ConfigError(f"Redis Cluster has only database 0, the URL asks for /{path}")
    kwargs: dict[str, Any] = {"ssl": scheme == "rediss-cluster"}
    creds, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, password = creds.partition(":")
        if colon:
            kwargs["password"] = unquote(password)
            if user:
                kwargs["username"] = unquote(user)
        else:
            kwargs["password"] = unquote(user)
    nodes = []
    for item in filter(None, hosts.split(",")):
        host, colon, port = item.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"Redis Cluster node must be host:port, got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ConfigError("Redis Cluster URL names no node (redis-cluster://host:port,...)")
    return nodes, kwargs


class LazyCluster:
    """A ``RedisCluster`` built on first use, whose "owner unreachable" errors are RedisErrors.

    Why not the bare client: ``RedisCluster()`` connects in its constructor, so a worker would
    not start while the cluster is down (a plain ``Redis`` client connects on first command,
    and the stores fall back locally); and redis-py reports an unserved slot (a master just
    failed, its replica not yet promoted) as ``SlotNotCoveredError``, which is not a
    ``RedisError``, so the stores' "unreachable: answer locally" path would not see it. Both
    become ``redis.exceptions.ConnectionError`` here. A script whose keys span slots still
    raises redis-py's own error: that is a bug to see, not an outage.
    """

    connection_pool = None  # no single pool: callers that want one (ReplyLater) must not use it

    def __init__(self, build: Callable[[], Any], *, decode_responses: bool = False) -> None:
        self._build = build
        self._decode = decode_responses
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def cluster(self) -> Any:
        """The ``RedisCluster`` itself (built now if it is not yet)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._guard(self._build)()
        return self._client

    @staticmethod
    def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisClusterException

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except RedisClusterException as exc:
                if "same key slot" in str(exc) or "same slot" in str(exc):
                    raise
                raise RedisConnectionError(f"Redis Cluster: {exc}") from exc

        return call

    def register_script(self, script: str) -> Any:
        from redis.commands.core import Script

        return Script(self, script)  # its EVALSHA goes through this object: guarded, lazy

    def get_encoder(self) -> Any:  # what Script needs, without connecting
        from redis.connection import Encoder

        return Encoder("utf-8", "strict", self._decode)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.cluster, name)
        return self._guard(attr) if callable(attr) else attr


def cluster_client(url: str, *, socket_timeout: float, socket_connect_timeout: float,
                   **kwargs: Any) -> Any:
    """A (lazy) ``RedisCluster`` whose every socket operation and retry is bounded.

    Retries are few and short (a state call must not stall a task): when a master has just
    failed, the store's local fallback answers until the replica has taken over.
    """
    from redis.backoff import ExponentialBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    nodes, conn = parse_cluster_url(url)
    conn.update(kwargs)

    def build() -> Any:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            # Slots of a master being replaced are briefly unserved; keep the others usable.
            require_full_coverage=False,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            **conn,
        )

    return LazyCluster(build, decode_responses=bool(conn.get("decode_responses")))
