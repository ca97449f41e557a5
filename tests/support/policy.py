"""Policy files for tests that need a dependency slower than the shipped policy allows."""

from __future__ import annotations

import re
from pathlib import Path


def with_timeouts(policy: Path, dependency: str, timeout_ms: int, deadline_ms: int,
                  out: Path) -> Path:
    """Copy ``policy`` to ``out`` with ``dependency``'s per-attempt timeout and deadline set."""
    head, sep, rest = policy.read_text().partition(f"[dependencies.{dependency}]\n")
    if not sep:
        raise ValueError(f"no [dependencies.{dependency}] table in {policy}")
    section, nxt, tail = rest.partition("\n[")
    section = re.sub(r"timeout_ms = \d+", f"timeout_ms = {timeout_ms}", section)
    section = re.sub(r"deadline_ms = \d+", f"deadline_ms = {deadline_ms}", section)
    out.write_text(head + sep + section + nxt + tail)
    return out
