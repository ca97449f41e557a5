"""The shared-state pieces a producer builds from the settings when it is not given them.

The state Redis client (short timeouts: it is on every enqueue), the job statuses written
without waiting for Redis' reply, the depth throttle and the per-client rate limiter. The HTTP
service builds the same ones for itself (``producers.api``).
"""

from __future__ import annotations

from typing import Any

from resilience.ratelimit import RateLimitConfig, RateLimiter
from resilience.stores import RedisStore, redis_client
from workers.depth import SharedDepthCache, probe_for
from workers.idempotency import ttl_from_env
from workers.jobs import JobStatuses
from workers.redis_line import ReplyLater
from workers.settings import Settings
from workers.topology import Topology

from .backpressure import Throttle, load_backpressure

__all__ = ["STATE_TIMEOUT_S", "build_throttle", "client_limiter", "job_statuses",
           "state_client"]

STATE_TIMEOUT_S = 0.5  # shared-state calls sit on every enqueue: never wait long on Redis


def state_client(settings: Settings) -> Any:
    """The shared-state Redis client producers use (short timeouts: it is on every call)."""
    return redis_client(settings.redis_url, socket_timeout=STATE_TIMEOUT_S,
                        socket_connect_timeout=STATE_TIMEOUT_S)


def job_statuses(client: Any) -> JobStatuses:
    """Job states written without waiting for Redis' reply (``workers.jobs``)."""
    replies = ReplyLater(client, name="tidegate-jobs") if getattr(
        client, "connection_pool", None) is not None else None
    return JobStatuses(client, ttl_from_env(), replies=replies)


def build_throttle(settings: Settings, topology: Topology, client: Any = None) -> Throttle:
    """The depth throttle from the policy file's ``[backpressure]`` tables."""
    default, per_queue = load_backpressure(settings.policy_file, topology)
    cache = SharedDepthCache(probe_for(settings, topology), client or state_client(settings))
    return Throttle(cache, default, per_queue)


def client_limiter(settings: Settings, config: RateLimitConfig, client: Any = None,
                   name: str = "producer-client") -> RateLimiter:
    """A per-client limiter shared by every producer through Redis (GCRA, one Lua call)."""
    store = RedisStore(client or state_client(settings), name=name)
    return RateLimiter(name, config, store)
