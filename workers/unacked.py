"""Reading kombu's Redis ``unacked`` records (``[payload, exchange, routing_key]`` as JSON),
for the depth probe's in-flight counts and the orphan report alike."""

from __future__ import annotations

import json
from collections.abc import Iterable


def per_queue(records: Iterable[bytes | str | None], queues: set[str]) -> dict[str, int]:
    """How many of ``records`` belong to each of ``queues`` (their routing key, else their
    exchange); empty or unreadable records and other queues' are not counted."""
    counts = dict.fromkeys(queues, 0)
    for raw in records:
        if not raw:
            continue
        try:
            _, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        name = routing_key or exchange
        if name in counts:
            counts[name] += 1
    return counts
