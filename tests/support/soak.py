"""Soak measurements: a process tree's resident memory, Redis key families and their TTLs.

Kept apart from the drill so the numbers it asserts on are easy to check by hand: RSS is
``VmRSS`` from /proc (no psutil needed), key families are key names with their per-job parts
folded into ``*``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                 r"|(?<=[:\-_.])[\w.@-]*\d[\w.@-]*$")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:  # the thread or process went away meanwhile
            continue
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (prefork children included)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match.group(1)) * 1024 if match else 0
        todo += _children(p)
    return total


def family(key: str) -> str:
    """``tidegate:idem:soak-17`` -> ``tidegate:idem:*``; ids and numbered names fold."""
    return _ID.sub("*", key)


@dataclass(frozen=True)
class KeyCensus:
    """Every key of one Redis database, by family, split by whether it carries a TTL."""

    with_ttl: Counter
    without_ttl: Counter
    max_ttl_s: dict[str, float]

    @property
    def total(self) -> int:
        return sum(self.with_ttl.values()) + sum(self.without_ttl.values())

    def describe(self) -> str:
        rows = [f"    {f}: {n} (TTL <= {self.max_ttl_s[f]:.0f} s)"
                for f, n in sorted(self.with_ttl.items())]
        rows += [f"    {f}: {n} (no TTL)" for f, n in sorted(self.without_ttl.items())]
        return "\n".join(rows) or "    (empty)"


def census(client: Any, scan_count: int = 500) -> KeyCensus:
    """Walk the database with SCAN (bounded batches) and ask each key's TTL."""
    with_ttl: Counter = Counter()
    without_ttl: Counter = Counter()
    max_ttl: dict[str, float] = {}
    keys = [k.decode() if isinstance(k, bytes) else k
            for k in client.scan_iter(count=scan_count)]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.pttl(k)
    for key, pttl in zip(keys, pipe.execute(), strict=True):
        f = family(key)
        if pttl is None or pttl == -2:  # expired between SCAN and PTTL
            continue
        if pttl == -1:
            without_ttl[f] += 1
        else:
            with_ttl[f] += 1
            max_ttl[f] = max(max_ttl.get(f, 0.0), pttl / 1000)
    return KeyCensus(with_ttl, without_ttl, max_ttl)


def halves(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the second half of a series."""
    mid = len(values) // 2
    return mean(values[:mid]), mean(values[mid:])
