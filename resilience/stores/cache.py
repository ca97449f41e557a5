"""Caches for the cached-value fallback: the last good answers, in memory or in Redis."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigError
from ..events import EVENTS, EventBus, StoreFailed
from .redis_store import check_timeouts

__all__ = ["Cache", "CacheEntry", "MemoryCache", "RedisCache"]

log = logging.getLogger(__name__)


class CacheEntry(NamedTuple):
    value: Any
    age: float  # seconds since it was stored


@runtime_checkable
class Cache(Protocol):
    """Last good values for the cached-value fallback. Errors never escape a cache."""

    def get(self, key: str) -> CacheEntry | None: ...

    def set(self, key: str, value: Any, ttl: float) -> None: ...


@dataclass
class _Stored:
    value: Any
    stored_at: float
    expires_at: float


class MemoryCache:
    """A bounded in-process cache (oldest entries evicted first)."""

    def __init__(self, max_entries: int = 10_000, clock: Clock = SYSTEM_CLOCK) -> None:
        if max_entries < 1:
            raise ConfigError(f"cache max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.clock = clock
        self._data: dict[str, _Stored] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> CacheEntry | None:
        now = self.clock.now()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if now >= item.expires_at:
                del self._data[key]
                return None
            return CacheEntry(item.value, now - item.stored_at)

    def set(self, key: str, value: Any, ttl: float) -> None:
        now = self.clock.now()
        with self._lock:
            self._data.pop(key, None)
            self._data[key] = _Stored(value, now, now + ttl)
            while len(self._data) > self.max_entries:
                del self._data[next(iter(self._data))]


class RedisCache:
    """Cache in Redis, JSON by default. A Redis error reads as a miss and skips the write."""

    def __init__(
        self,
        client: Any,
        prefix: str = "tidegate",
        *,
        dumps: Callable[[Any], str] = json.dumps,
        loads: Callable[[str | bytes], Any] = json.loads,
        events: EventBus = EVENTS,
    ) -> None:
        import redis

        check_timeouts(client)
        self.client = client
        self.prefix = prefix
        self.dumps = dumps
        self.loads = loads
        self.events = events
        self._errors = (redis.exceptions.RedisError, OSError)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:cache:{key}"

    def get(self, key: str) -> CacheEntry | None:
        try:
            raw = self.client.get(self._key(key))
            if raw is None:
                return None
            doc = json.loads(raw)
            return CacheEntry(self.loads(doc["v"]), max(0.0, time.time() - doc["t"]))
        except self._errors:
            self.events.emit(StoreFailed("redis_cache", "get"))
            return None
        except (ValueError, KeyError, TypeError):
            return None

    def set(self, key: str, value: Any, ttl: float) -> None:
        try:
            doc = json.dumps({"v": self.dumps(value), "t": time.time()})
            self.client.set(self._key(key), doc, px=max(1, math.ceil(ttl * 1000)))
        except self._errors:
            self.events.emit(StoreFailed("redis_cache", "set"))
        except (TypeError, ValueError):
            log.warning("value for cache key %s is not serialisable; not cached", key)
