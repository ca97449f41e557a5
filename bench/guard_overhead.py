"""Per-call cost of the success path: bare call, tenacity alone, pybreaker alone, Tidegate's
full chain in memory, and the full chain with Redis-shared state. One run, ratios printed
(absolute times on a shared machine are noise; ratios are the figure).

The Tidegate chains use the policy default, the cooperative timeout mode (attempts inline);
one more row shows the same chain in the abandon mode (every attempt handed to the
bulkhead's thread pool), which is what a dependency with ``timeout.mode = "abandon"`` pays.

    .venv/bin/python bench/guard_overhead.py [--calls 20000] [--redis redis://127.0.0.1:6379/9]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from dataclasses import replace

import pybreaker
import tenacity

from resilience.policy import Policy, PolicyConfig
from resilience.retry import RetryConfig
from resilience.stores import RedisStore, redis_client


def work(x: int) -> int:
    return x + 1


def per_call(fn, calls: int, repeats: int = 5) -> float:
    """Median seconds per call over ``repeats`` runs of ``calls`` calls."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        runs.append((time.perf_counter() - t0) / calls)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    args = ap.parse_args()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_exponential()
    )
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    cfg = PolicyConfig(
        name="bench", idempotent=True, timeout=1.0, deadline=2.0, retry=RetryConfig()
    )
    memory = Policy(cfg)
    abandon = Policy(replace(cfg, name="bench-abandon", timeout_mode="abandon"))
    cases = {
        "bare call": work,
        "tenacity alone": lambda i: retrying(work, i),
        "pybreaker alone": lambda i: breaker.call(work, i),
        "tidegate chain, memory": lambda i: memory.call(work, i),
        "tidegate chain, memory, abandon": lambda i: abandon.call(work, i),
    }
    shared_store = None
    try:
        client = redis_client(args.redis, socket_timeout=1.0, socket_connect_timeout=1.0)
        client.ping()
        shared_store = RedisStore(client, prefix=f"bench-{uuid.uuid4().hex[:6]}")
        shared = Policy(cfg, store=shared_store)
        cases["tidegate chain, redis-shared"] = lambda i: shared.call(work, i)
    except Exception as exc:  # the run still reports the rest
        print(f"(redis case skipped: {exc})")

    for fn in cases.values():  # warm up (thread pool, scripts loaded)
        per_call(fn, 500, repeats=1)
    results = {name: per_call(fn, args.calls) for name, fn in cases.items()}
    if shared_store is not None:
        shared_store.clear()

    bare, ten = results["bare call"], results["tenacity alone"]
    print(
        f"{'case':32} {'us/call':>9} {'x bare':>8} {'x tenacity':>11} {'overhead/tenacity ovh':>22}"
    )
    for name, t in results.items():
        ovh = (t - bare) / (ten - bare) if ten > bare else float("nan")
        print(f"{name:32} {t * 1e6:9.2f} {t / bare:8.1f} {t / ten:11.2f} {ovh:22.2f}")
    if "tidegate chain, redis-shared" in results:
        ratio = results["tidegate chain, redis-shared"] / results["tidegate chain, memory"]
        print(f"redis-shared / memory chain: {ratio:.2f} (target <= 2)")
    print(
        f"full chain (memory, cooperative) / tenacity alone: "
        f"{results['tidegate chain, memory'] / ten:.2f} (issue target <= 0.2)"
    )
    print(
        f"full chain (memory, abandon) / tenacity alone: "
        f"{results['tidegate chain, memory, abandon'] / ten:.2f}"
    )


if __name__ == "__main__":
    main()
