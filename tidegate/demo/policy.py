"""The demo's policy file: the shipped ``workers/policy.toml`` with demo-sized numbers.

Why not the shipped file as is: its URLs point at ``make run``'s simulators, its watermarks
(1,000/2,000) are sized for production workers, and the seed's 30 s open circuit only fits a
two-minute storm. So the demo rewrites the URLs, sets small watermarks that its small workers
reach within seconds, and, for runs shorter than two minutes, shortens the breaker and retry
timings by the same factor (never below a floor that keeps them meaningful).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.stack import ROOT

SHIPPED = ROOT / "workers" / "policy.toml"
FULL_LENGTH_S = 120.0  # the storm the seed's timings were chosen for

# Depth (ready messages) at which LOW starts to be shed, and above which only CRITICAL gets in.
# Threads per demo worker (celery -c); the policy file says the same (autoscaling tables), so
# the desired-workers figure is computed from what actually runs.
WORKERS = {"payments": 4, "search": 2, "email": 2}
WATERMARKS = {"payments": (200, 400), "search": (20, 60), "email": (10, 40), "default": (20, 60)}


@dataclass(frozen=True)
class Timings:
    """Breaker and retry timings for one run (seed values for a full-length storm)."""

    window_s: float
    open_s: float
    retry_base_s: float
    retry_max_wait_s: float

    @classmethod
    def for_duration(cls, duration_s: float) -> Timings:
        f = min(1.0, duration_s / FULL_LENGTH_S)
        # The window keeps 8 s at least: a short storm on a busy machine still has to see
        # the breaker's minimum number of calls inside one window.
        return cls(window_s=max(8.0, 10.0 * f), open_s=max(6.0, 30.0 * f),
                   retry_base_s=max(0.25, 1.0 * f), retry_max_wait_s=max(4.0, 30.0 * f))

    @property
    def visibility_timeout_s(self) -> int:
        """Above the longest broker countdown (a retry waits at most ``retry_max_wait_s``):
        Redis must not hand a held retry to a second worker, yet a killed worker's tasks
        should come back within the demo."""
        return int(self.retry_max_wait_s + 15)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for nested tables of scalars and lists (all the policy file has)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = []
    if scalars:
        out.append((f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n")
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.append(to_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(part for part in out if part)


def demo_policy(urls: Mapping[str, str], timings: Timings) -> dict[str, Any]:
    """The shipped policy with the demo's URLs, watermarks, timings and worker threads."""
    data = tomllib.loads(SHIPPED.read_text())
    for name, table in data["dependencies"].items():
        table["url"] = urls[name]
        table["breaker"] = {**table.get("breaker", {}), "window_s": timings.window_s,
                            "open_s": timings.open_s}
        if table.get("idempotent"):
            table["retry"] = {**table.get("retry", {}), "base_s": timings.retry_base_s,
                              "max_wait_s": timings.retry_max_wait_s}
    for queue, threads in WORKERS.items():
        data.setdefault("autoscaling", {}).setdefault(queue, {})["worker_concurrency"] = threads
    data["backpressure"] = {q: {"low_watermark": lo, "high_watermark": hi}
                            for q, (lo, hi) in WATERMARKS.items()}
    return data


def write_policy(path: Path, urls: Mapping[str, str], timings: Timings) -> Path:
    path.write_text("# Written by `tidegate demo` (tidegate/demo/policy.py): the shipped\n"
                    "# workers/policy.toml with the demo's URLs, watermarks and timings.\n\n"
                    + to_toml(demo_policy(urls, timings)))
    return path
