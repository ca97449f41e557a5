"""The Redis state store: every worker and producer sees one state.

Each operation is one Lua script (``lua/*.lua``, read once per process and registered once per
client), so read-decide-write is atomic and costs one round trip; scripts take time from the
Redis server (``TIME``) so processes on different hosts agree on it.

Degraded mode: if Redis is unreachable, :class:`RedisStore` answers from a local
:class:`~resilience.stores.memory.MemoryStore`, says so (a ``StoreDegraded`` event, which the
metrics turn into ``tidegate_state_store_degraded{store=...}`` = 1) and tries Redis again after
``retry_interval``: a call is never failed because the state store is down.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigError
from ..events import EVENTS, EventBus, StoreDegraded, StoreFailed
from .breaker import RedisBreakerOps
from .memory import MemoryStore
from .ratelimit import RedisGcraOps
from .retry_budget import RedisBudgetOps

__all__ = ["SCRIPTS", "RedisStore", "check_timeouts", "lua_source", "redis_client"]


SCRIPTS = ("breaker", "gcra", "retry_budget")
"""The Lua scripts in ``resilience/stores/lua/`` (each runs after ``now.lua``)."""


@functools.cache
def lua_source(name: str) -> str:
    """The text of script ``name``: ``now.lua`` then ``NAME.lua`` (read once per process)."""
    folder = resources.files(__package__).joinpath("lua")
    return folder.joinpath("now.lua").read_text() + folder.joinpath(f"{name}.lua").read_text()


def redis_client(
    url: str = "redis://127.0.0.1:6379/0",
    *,
    socket_timeout: float = 0.1,
    socket_connect_timeout: float = 0.1,
    **kwargs: Any,
):
    """A redis-py client that cannot hang: every socket operation has a timeout."""
    import redis

    if not socket_timeout or not socket_connect_timeout:
        raise ConfigError("Redis state store needs finite socket timeouts (never infinite)")
    if url.startswith(("redis-cluster://", "rediss-cluster://")):  # resilience.redis_cluster
        from resilience.redis_cluster import cluster_client

        return cluster_client(url, socket_timeout=socket_timeout,
                              socket_connect_timeout=socket_connect_timeout, **kwargs)
    if url.startswith("sentinel://"):  # resilience.redis_sentinel
        from resilience.redis_sentinel import sentinel_client

        return sentinel_client(url, socket_timeout=socket_timeout,
                               socket_connect_timeout=socket_connect_timeout, **kwargs)
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        **kwargs,
    )


def check_timeouts(client: Any) -> None:
    """Refuse a client whose sockets could wait forever."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if kwargs is None:  # a cluster client or a fake: trust the caller
        return
    if kwargs.get("socket_timeout") is None:
        raise ConfigError(
            "Redis client has no socket_timeout: build it with resilience.stores.redis_client() "
            "or pass socket_timeout/socket_connect_timeout"
        )


class RedisStore(RedisBreakerOps, RedisGcraOps, RedisBudgetOps):
    """Shared state in Redis. Keys look like ``{tidegate:breaker:payments}:state``.

    The hash tag keeps one breaker's (or limiter key's) keys in one Redis Cluster slot so
    each Lua script touches a single slot. The client must have socket timeouts
    (:func:`redis_client` builds one); a client without is refused.

    ``clock``: ``None`` uses the Redis server's clock (right for many hosts); pass a clock
    only in tests that drive time by hand.
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "tidegate",
        *,
        clock: Clock | None = None,
        fallback: MemoryStore | None = None,
        retry_interval: float = 1.0,
        name: str = "redis",
        events: EventBus = EVENTS,
    ) -> None:
        import redis

        check_timeouts(client)
        self.client = client
        self.prefix = prefix
        self.name = name
        self.clock = clock
        self.fallback = fallback if fallback is not None else MemoryStore(clock or SYSTEM_CLOCK)
        self.retry_interval = retry_interval
        self.events = events
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._down_until = 0.0
        self._degraded = False
        scripts = {name: client.register_script(lua_source(name)) for name in SCRIPTS}
        self._script = scripts.__getitem__
        events.emit(StoreDegraded(name, False))

    def key(self, kind: str, name: str, suffix: str = "") -> str:
        base = "{" + f"{self.prefix}:{kind}:{name}" + "}"
        return f"{base}:{suffix}" if suffix else base

    def _now_arg(self) -> str:
        return "" if self.clock is None else repr(self.clock.now())

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and the local fallback answers."""
        return self._degraded

    def _run(self, operation: str, remote: Callable[[], Any], local: Callable[[], Any]) -> Any:
        if self._degraded and time.monotonic() < self._down_until:
            return local()
        try:
            result = remote()
        except self._errors as exc:
            self.events.emit(StoreFailed(self.name, operation))
            self._down_until = time.monotonic() + self.retry_interval
            if not self._degraded:
                self._degraded = True
                self.events.emit(StoreDegraded(self.name, True, str(exc)))
            return local()
        if self._degraded:
            self._degraded = False
            self.events.emit(StoreDegraded(self.name, False, "reachable again"))
        return result

    def clear(self) -> int:
        """Delete every key under this store's prefix (tests and operators). Returns the count."""
        n = 0
        for pattern in (f"{{{self.prefix}:*", f"{self.prefix}:*"):
            for k in self.client.scan_iter(match=pattern, count=500):
                n += self.client.delete(k)
        return n
