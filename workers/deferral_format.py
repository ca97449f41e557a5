"""The deferral queues' layout and the format of what is stored in them.

:class:`SqsQueueSpec` names one dependency's deferral queue and its DLQ (names created when
missing, URLs used as given) with their redrive policy and retention; :func:`encode_entry` and
:func:`decode_entry` turn a :class:`~resilience.fallback.DeferredRequest` into the versioned
JSON body SQS holds and back; :class:`DeferredEntry` is one received message, and
:class:`QueueStats` SQS's approximate counts. The store that reads and writes them is
``workers.sqs_deferral``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from resilience.errors import ConfigError
from resilience.fallback import DeferredRequest

__all__ = ["ENTRY_VERSION", "SQS_MAX_BATCH", "SQS_MAX_RETENTION_S", "DeferredEntry",
           "QueueStats", "SqsQueueSpec", "decode_entry", "encode_entry", "is_url"]

ENTRY_VERSION = 1
SQS_MAX_BATCH = 10  # ReceiveMessage / DeleteMessageBatch limit
SQS_MAX_RETENTION_S = 14 * 24 * 3600


def is_url(value: str) -> bool:
    """A queue given by URL (used as given) rather than by name (created when missing)."""
    return value.startswith(("http://", "https://"))


def _check_queue_name(value: str, what: str) -> str:
    if is_url(value):
        return value
    ok = 1 <= len(value) <= 80 and all(c.isalnum() or c in "-_" for c in value)
    if not ok:
        raise ConfigError(
            f"{what} {value!r} is not a legal SQS queue name (1-80 of A-Z a-z 0-9 - _) "
            "nor a queue URL"
        )
    return value


@dataclass(frozen=True)
class SqsQueueSpec:
    """One dependency's deferral queue and its DLQ, each a queue name or a queue URL.

    Names are created if missing, with ``RedrivePolicy`` (``max_receive_count``) and
    ``retention_s``; URLs are used as given and never modified.
    """

    dependency: str
    queue: str
    dead_letter_queue: str
    max_receive_count: int = 10
    retention_s: int = SQS_MAX_RETENTION_S
    near_retention_s: int = 24 * 3600  # entries closer than this to expiry are flagged

    def __post_init__(self) -> None:
        _check_queue_name(self.queue, f"{self.dependency}: deferral queue")
        _check_queue_name(self.dead_letter_queue, f"{self.dependency}: deferral DLQ")
        if not (isinstance(self.max_receive_count, int) and 1 <= self.max_receive_count <= 1000):
            raise ConfigError(
                f"{self.dependency}: max_receive_count must be 1-1000, "
                f"got {self.max_receive_count!r}"
            )
        retention_ok = isinstance(self.retention_s, int) and self.retention_s >= 60
        if not (retention_ok and self.retention_s <= SQS_MAX_RETENTION_S):
            raise ConfigError(
                f"{self.dependency}: retention must be 60-{SQS_MAX_RETENTION_S} s, "
                f"got {self.retention_s!r}"
            )
        if not (isinstance(self.near_retention_s, int) and self.near_retention_s >= 0):
            raise ConfigError(f"{self.dependency}: near_retention_s must be >= 0")

    @classmethod
    def named(cls, dependency: str, prefix: str = "tidegate-deferred-", **kw: Any) -> SqsQueueSpec:
        """``tidegate-deferred-email`` and ``tidegate-deferred-email-dlq``."""
        base = f"{prefix}{dependency}".replace(".", "-")
        return cls(dependency, base, f"{base}-dlq", **kw)

# --------------------------------------------------------------------------- entries


def encode_entry(request: DeferredRequest) -> str:
    """The JSON body stored in SQS (versioned, so old entries stay readable)."""
    return json.dumps(
        {
            "v": ENTRY_VERSION,
            "dependency": request.dependency,
            "task": request.task,
            "args": list(request.args),
            "kwargs": dict(request.kwargs),
            "idempotency_key": request.idempotency_key,
            "priority": int(request.priority),
            "reason": request.reason,
            "first_deferred_at": request.first_deferred_at,
            "deferrals": int(request.deferrals),
        },
        separators=(",", ":"),
        allow_nan=False,
    )


def decode_entry(body: str) -> DeferredRequest:
    """Parse a stored body; a ValueError names what is wrong (the entry is poison)."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("entry is not a JSON object")
    if data.get("v") != ENTRY_VERSION:
        raise ValueError(f"unknown entry version {data.get('v')!r}")
    missing = [k for k in ("dependency", "task", "idempotency_key") if not data.get(k)]
    if missing:
        raise ValueError(f"entry lacks {', '.join(missing)}")
    if not isinstance(data.get("args", []), list) or not isinstance(data.get("kwargs", {}), dict):
        raise ValueError("entry args must be a list and kwargs an object")
    return DeferredRequest(
        dependency=str(data["dependency"]),
        task=str(data["task"]),
        args=tuple(data.get("args", [])),
        kwargs=dict(data.get("kwargs", {})),
        idempotency_key=str(data["idempotency_key"]),
        priority=int(data.get("priority", 1)),
        reason=str(data.get("reason", "")),
        first_deferred_at=float(data.get("first_deferred_at", 0.0)),
        deferrals=int(data.get("deferrals", 1)),
    )


@dataclass(frozen=True)
class DeferredEntry:
    """One received SQS message: the request (None if it is poison) and SQS's view of it."""

    message_id: str
    receipt_handle: str
    receive_count: int
    sent_at: float  # epoch seconds: when this message entered SQS (retention counts from here)
    request: DeferredRequest | None
    error: str | None = None  # why ``request`` is None
    body_bytes: int = 0

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.sent_at)


@dataclass(frozen=True)
class QueueStats:
    """Approximate counts from GetQueueAttributes (SQS never gives exact ones)."""

    visible: int
    in_flight: int
    delayed: int
    dead: int

    @property
    def total(self) -> int:
        return self.visible + self.in_flight + self.delayed
