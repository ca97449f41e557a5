"""Each dependency's observed P99 and its suggested timeout (P99 x 2), shared through Redis.

Attempt durations are recorded in the process that makes the calls (each policy's latency
window, :mod:`resilience.latency`); the exporter, ``tidegate depth`` and ``tidegate policy
check --live`` run elsewhere. So every worker process writes, every ``interval_s``, one field
per dependency into one Redis hash: its window's P99, the number of samples and when. A
reader takes the entries fresher than ``FRESH_S`` and, per dependency, the *largest* P99 of
them (a timeout set from it fires on no process's healthy calls) and the samples summed.

The seed's rule and its bounds: a timeout below P99 x 2 fires on healthy calls; one above
4 x P99 holds threads for nothing (:func:`verdict`).

The same writer shares each adaptive concurrency limit (:mod:`resilience.adaptive`) into
``CONCURRENCY_KEY``: the process's current limit, in flight, waiting and latency baseline.
Every process adapts alone, so a dependency's cluster-wide limit and in-flight count are the
*sums* over the fresh entries (what the dependency can receive at once from all of them); the
baseline is the *lowest* (the best latency any process saw: each one's is a minimum already).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workers.mirror import Ticker, in_every_worker_process

__all__ = ["CONCURRENCY_KEY", "FRESH_S", "HASH_KEY", "LatencyMirror", "ObservedConcurrency",
           "ObservedLatency", "install", "publish", "publish_concurrency", "read_concurrency",
           "read_latency", "verdict"]

log = logging.getLogger(__name__)

HASH_KEY = "tidegate:cluster:latency"
CONCURRENCY_KEY = "tidegate:cluster:concurrency"
FRESH_S = 60.0  # an entry older than this is a process that stopped: not read
MIN_SAMPLES = 20  # an adaptive timeout follows the shared P99 only over this many attempts


@dataclass(frozen=True)
class ObservedLatency:
    dependency: str
    p99_s: float
    samples: int  # over every process's window
    processes: int

    @property
    def suggested_timeout_s(self) -> float:
        """The seed's rule: P99 x 2."""
        return self.p99_s * 2


@dataclass(frozen=True)
class ObservedConcurrency:
    """A dependency's adaptive limit over the processes that published one lately."""

    dependency: str
    limit: int  # summed: what the dependency may receive at once from all processes
    in_flight: int  # summed
    waiting: int  # summed: callers queued for a slot
    baseline_s: float | None  # the lowest baseline (None: no process has one yet)
    processes: int


def verdict(timeout_s: float, p99_s: float) -> str | None:
    """Why ``timeout_s`` is off the seed's rule for this P99, or None when it is within
    [P99 x 2, 4 x P99]."""
    if timeout_s < p99_s * 2:
        return (f"timeout {timeout_s * 1000:g} ms is below P99 x 2 ({p99_s * 2000:.0f} ms): "
                "it will fire on healthy calls")
    if timeout_s > p99_s * 4:
        return (f"timeout {timeout_s * 1000:g} ms is above 4 x P99 ({p99_s * 4000:.0f} ms): "
                "threads are held far longer than the dependency needs")
    return None


def publish(client: Any, policies: Mapping[str, Any], process: str,
            now: Callable[[], float] = time.time, key: str = HASH_KEY) -> int:
    """Write this process's P99 per dependency (those with samples); returns how many."""
    fields = {}
    for name, policy in policies.items():
        rec = policy.latency
        p99 = rec.p99()
        if p99 is not None:
            fields[f"{name}|{process}"] = json.dumps(
                {"p99_s": p99, "n": len(rec), "at": now()})
    if fields:
        client.hset(key, mapping=fields)
    return len(fields)


def publish_concurrency(client: Any, policies: Mapping[str, Any], process: str,
                        now: Callable[[], float] = time.time,
                        key: str = CONCURRENCY_KEY) -> int:
    """Write this process's adaptive limit per dependency (those that have one)."""
    fields = {}
    for name, policy in policies.items():
        limiter = getattr(policy, "adaptive_limiter", None)
        if limiter is not None:
            fields[f"{name}|{process}"] = json.dumps(
                {"limit": limiter.limit, "in_flight": limiter.in_flight,
                 "waiting": limiter.waiting, "baseline_s": limiter.baseline, "at": now()})
    if fields:
        client.hset(key, mapping=fields)
    return len(fields)


def _fresh(client: Any, key: str, now: Callable[[], float]) -> dict[str, list[dict[str, Any]]]:
    """The entries fresher than ``FRESH_S`` per dependency; stale ones are deleted."""
    cutoff = now() - FRESH_S
    seen: dict[str, list[dict[str, Any]]] = {}
    stale = []
    for raw_field, raw in client.hgetall(key).items():
        field = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
        try:
            entry = json.loads(raw)
            fresh = float(entry["at"]) >= cutoff
        except (ValueError, KeyError, TypeError):
            fresh = False
        if not fresh:
            stale.append(field)
            continue
        seen.setdefault(field.split("|", 1)[0], []).append(entry)
    if stale:  # processes that stopped: their windows no longer describe the dependency
        client.hdel(key, *stale)
    return seen


def read_concurrency(client: Any, now: Callable[[], float] = time.time,
                     key: str = CONCURRENCY_KEY) -> dict[str, ObservedConcurrency]:
    """Per dependency, over the fresh entries: limit, in flight and waiting summed, the
    lowest baseline."""
    out = {}
    for dep, entries in _fresh(client, key, now).items():
        try:
            baselines = [float(e["baseline_s"]) for e in entries
                         if e.get("baseline_s") is not None]
            out[dep] = ObservedConcurrency(
                dep, sum(int(e["limit"]) for e in entries),
                sum(int(e["in_flight"]) for e in entries),
                sum(int(e.get("waiting", 0)) for e in entries),
                min(baselines) if baselines else None, len(entries))
        except (KeyError, TypeError, ValueError):  # a malformed entry: not this dependency's
            continue
    return out


def read_latency(client: Any, now: Callable[[], float] = time.time,
                 key: str = HASH_KEY) -> dict[str, ObservedLatency]:
    """Per dependency, over the fresh entries: the largest P99 and the samples summed."""
    seen = _fresh(client, key, now)
    return {
        dep: ObservedLatency(dep, max(float(e["p99_s"]) for e in entries),
                             sum(int(e["n"]) for e in entries), len(entries))
        for dep, entries in seen.items()
    }


class LatencyMirror:
    """Publishes this process's latency windows every ``interval_s`` (a daemon thread)."""

    def __init__(self, client: Any, policies: Callable[[], Mapping[str, Any] | None], *,
                 interval_s: float = 5.0) -> None:
        self.client, self.policies, self.interval_s = client, policies, interval_s
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        # Redis away: the next tick tries again
        self._ticker = Ticker(self.flush, interval_s, name="tidegate-latency-mirror",
                              failure="latency windows not published", log=log)

    def flush(self) -> int:
        """Publish this process's windows; then adapt every ``timeout_ms = "p99x2"`` policy
        to the P99 shared by all processes (once it holds ``MIN_SAMPLES``)."""
        policies = self.policies()
        if not policies:
            return 0
        n = publish(self.client, policies, self.process)
        publish_concurrency(self.client, policies, self.process)
        adaptive = {k: p for k, p in policies.items() if p.config.adaptive_timeout}
        if adaptive:
            observed = read_latency(self.client)
            for name, policy in adaptive.items():
                seen = observed.get(name)
                if seen is not None and seen.samples >= MIN_SAMPLES:
                    policy.follow_p99(seen.p99_s)
        return n

    def start(self) -> LatencyMirror:
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._ticker.stop()


def install(app: Any, client: Any, *, interval_s: float = 5.0) -> None:
    """Run a mirror in every Celery worker process; it publishes the policies this process
    has built (none until its first task)."""
    from workers.policies import existing_state

    def policies() -> Mapping[str, Any] | None:
        state = existing_state(app)
        if state is None:
            return None
        return {name: state.policy(name) for name in state.registry.names()}

    in_every_worker_process(
        lambda: LatencyMirror(client, policies, interval_s=interval_s).start())
