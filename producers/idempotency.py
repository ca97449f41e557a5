"""Idempotent job submission over HTTP: a repeated POST with the same key returns the first job.

One Redis key per (client, idempotency key) holds ``pending`` while the first request is
being enqueued and the job afterwards, for ``ttl_s``. The reservation is ``SET NX``, so two
concurrent requests cannot both enqueue; a request that fails to enqueue releases its
reservation (compare-and-delete), so the client's retry is not answered with a job that
never existed. The stored fingerprint of the request catches a key reused for a different
job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from resilience.errors import TransientError

__all__ = ["IdempotencyConflict", "IdempotencyUnavailable", "Reservation", "SubmissionStore"]

log = logging.getLogger(__name__)

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IdempotencyUnavailable(TransientError):
    """The idempotency store cannot be reached: refusing beats enqueueing a duplicate."""


class IdempotencyConflict(TransientError):
    """The first request with this key is still being enqueued."""


@dataclass(frozen=True)
class Reservation:
    """Either ours to fill (``job is None``) or the first request's stored job."""

    key: str
    token: str
    job: dict[str, Any] | None = None
    fingerprint_matches: bool = True


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class SubmissionStore:
    """Redis-backed ``(client, key) -> job`` map with a TTL (default one day)."""

    def __init__(self, client: Any, *, ttl_s: int = 86_400, prefix: str = "tidegate:api:idem",
                 pending_wait_s: float = 2.0) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.pending_wait_s = pending_wait_s
        self._release = client.register_script(_RELEASE_LUA)

    def _key(self, client_id: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"{self.prefix}:{client_id}:{digest}"

    def reserve(self, client_id: str, key: str, body: dict[str, Any],
                wait_s: float | None = None) -> Reservation:
        """Reserve ``key`` or return its record; while another request holds it pending, wait
        up to ``wait_s`` (default ``pending_wait_s``; 0: do not wait), then
        IdempotencyConflict."""
        import redis

        rkey, fp = self._key(client_id, key), fingerprint(body)
        pending = json.dumps({"state": "pending", "fingerprint": fp, "at": time.time()})
        deadline = time.monotonic() + (self.pending_wait_s if wait_s is None else wait_s)
        try:
            while True:
                if self.redis.set(rkey, pending, nx=True, ex=self.ttl_s):
                    return Reservation(rkey, pending)
                raw = self.redis.get(rkey)
                if raw is None:
                    continue  # released or expired in between: try to reserve again
                stored = json.loads(raw)
                if stored.get("fingerprint") != fp:
                    return Reservation(rkey, "", stored.get("job"), fingerprint_matches=False)
                if stored.get("state") == "done":
                    return Reservation(rkey, "", stored["job"])
                if time.monotonic() >= deadline:
                    raise IdempotencyConflict(
                        "a request with this idempotency_key is still being processed")
                time.sleep(0.05)
        except (redis.RedisError, OSError) as exc:
            raise IdempotencyUnavailable(f"idempotency store unavailable: {exc}") from None

    def complete(self, reservation: Reservation, job: dict[str, Any]) -> None:
        import redis

        stored = json.loads(reservation.token)
        value = json.dumps({"state": "done", "fingerprint": stored["fingerprint"], "job": job})
        try:
            self.redis.set(reservation.key, value, ex=self.ttl_s)
        except (redis.RedisError, OSError) as exc:
            # The job IS queued, so the caller still gets it. A retry would enqueue it again
            # under the same task id and idempotency key, which the workers' store absorbs.
            log.warning("job %s queued but its idempotency record failed: %s",
                        job.get("id"), exc)

    def release(self, reservation: Reservation) -> None:
        import contextlib

        import redis

        with contextlib.suppress(redis.RedisError, OSError):
            self._release(keys=[reservation.key], args=[reservation.token])
