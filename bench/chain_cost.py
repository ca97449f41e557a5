"""Success-path cost of the full chain vs tenacity alone, as a minimum of many short runs.

``guard_overhead.py`` prints medians of a few long runs, which a loaded machine inflates
unevenly; the minimum of many short runs is the least disturbed figure, and interleaving the
two cases keeps them in the same minutes. To compare two trees, run this once per tree,
alternating (``PYTHONPATH=<tree>`` picks the code)::

    .venv/bin/python bench/chain_cost.py [--runs 800] [--calls 200]
"""

from __future__ import annotations

import argparse
import time

import tenacity

from resilience.policy import Policy, PolicyConfig
from resilience.retry import RetryConfig


def work(x: int) -> int:
    return x + 1


def fastest(fn, runs: int, calls: int) -> float:
    """Seconds per call of the fastest of ``runs`` runs of ``calls`` calls of ``fn(work, i)``."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(work, i)
        best = min(best, time.perf_counter() - t0)
    return best / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=800)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if args.runs < 1 or args.calls < 1:
        ap.error("--runs and --calls must be >= 1")
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_exponential()
    )
    cfg = PolicyConfig(
        name="bench", idempotent=True, timeout=1.0, deadline=2.0, retry=RetryConfig()
    )
    policy = Policy(cfg)  # the same config as guard_overhead.py
    ten = chain = float("inf")
    for _ in range(max(1, args.runs // 50)):  # interleaved in blocks of 50 runs
        ten = min(ten, fastest(retrying, 50, args.calls))
        chain = min(chain, fastest(policy.call, 50, args.calls))
    print(f"tenacity alone {ten * 1e6:.3f} us/call, full chain {chain * 1e6:.3f} us/call, "
          f"chain / tenacity {chain / ten:.3f} (issue target <= 0.2)")


if __name__ == "__main__":
    main()
