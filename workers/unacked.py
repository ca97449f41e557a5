"""Reading kombu's Redis ``unacked`` records (``[payload, exchange, routing_key]`` as JSON),
for the depth probe's in-flight counts and the orphan report alike."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any


def per_queue(records: Iterable[bytes | str | None], queues: set[str]) -> dict[str, int]:
    """How many of ``records`` belong to each of ``queues`` (their routing key, else their
    exchange); empty or unreadable records and other queues' are not counted."""
    return split_per_queue(records, queues)[0]


def split_per_queue(records: Iterable[bytes | str | None], queues: set[str],
                    now: float | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Per queue: every unacked record of it, and those of them whose ETA is still ahead.

    The second count is the retries a worker holds until their countdown ends (Celery takes an
    ETA task at once and keeps it unacked): unacked, but nobody is working on them, so the
    status page shows them as retries waiting rather than in flight.
    """
    now = time.time() if now is None else now
    counts = dict.fromkeys(queues, 0)
    held = dict.fromkeys(queues, 0)
    for raw in records:
        if not raw:
            continue
        try:
            message, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        name = routing_key or exchange
        if name in counts:
            counts[name] += 1
            if _eta_ahead(message, now):
                held[name] += 1
    return counts, held


def _eta_ahead(message: Any, now: float) -> bool:
    try:
        eta = (message.get("headers") or {}).get("eta")
        return bool(eta) and datetime.fromisoformat(eta).timestamp() > now
    except (AttributeError, TypeError, ValueError):
        return False
