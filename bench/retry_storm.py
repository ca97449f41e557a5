"""Retry storm: 1,000 clients hit a failing dependency at the same moment.

What the seed warns about: naive retries turn one failure into a synchronized wave. This runs
a discrete-event simulation on a fake clock through Tidegate's real schedule
(``resilience.retry.backoff_delay``) and real budget (``resilience.retry.RetryBudget``), three
ways in the same run:

- no jitter: the seed's 2^n waits without the random part (the baseline),
- jitter: the seed's 2^n + U(0, 2^(n-1)) waits,
- jitter + retry budget: retries capped at 20% of requests plus a floor of 10/s.

It prints the peak and p99 retries per 100 ms bucket and the total load on the dependency,
with the ratios against the no-jitter baseline. Seeded, so the figures are repeatable.

    .venv/bin/python bench/retry_storm.py [--clients 1000] [--seed 7]
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import Counter
from dataclasses import dataclass

from resilience.clock import FakeClock
from resilience.retry import RetryBudget, RetryConfig, backoff_delay
from resilience.stores import MemoryStore

BUCKET = 0.1  # seconds


class _NoJitter:
    """An rng whose uniform() is always the low end: the seed's schedule without jitter."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return low


@dataclass(frozen=True)
class Outcome:
    name: str
    first_attempts: int
    retries: int
    peak_per_bucket: int
    p99_per_bucket: int
    busy_buckets: int

    @property
    def load_factor(self) -> float:
        return (self.first_attempts + self.retries) / self.first_attempts


def simulate(name: str, clients: int, *, jitter: bool, budget: bool, seed: int,
             arrival_window: float = 0.1) -> Outcome:
    """Every call fails (the dependency is down for the whole run); count the retries."""
    rng = random.Random(seed)
    schedule_rng = rng if jitter else _NoJitter()
    cfg = RetryConfig()  # the seed: 4 attempts, base 1 s, max wait 30 s
    clock = FakeClock(start=0.0)
    retry_budget = RetryBudget(store=MemoryStore(clock), clock=clock, name=name) if budget else None
    events: list[tuple[float, int, int]] = [
        (rng.uniform(0, arrival_window), client, 1) for client in range(clients)
    ]
    heapq.heapify(events)
    retries_per_bucket: Counter[int] = Counter()
    retries = 0
    while events:
        at, client, attempt = heapq.heappop(events)
        clock.advance(at - clock.now())
        if attempt == 1:
            if retry_budget:
                retry_budget.record_request()
        else:
            retries += 1
            retries_per_bucket[int(at / BUCKET)] += 1
        # The dependency is down: the attempt fails. Retry if attempts and budget allow.
        if attempt < cfg.max_attempts and (retry_budget is None or retry_budget.try_spend()):
            delay = backoff_delay(attempt + 1, cfg, schedule_rng)
            heapq.heappush(events, (at + delay, client, attempt + 1))
    counts = sorted(retries_per_bucket.values()) or [0]
    p99 = counts[min(len(counts) - 1, int(0.99 * len(counts)))]
    return Outcome(name, clients, retries, counts[-1], p99, len(counts))


def main(argv: list[str] | None = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    runs = [
        simulate("no jitter (baseline)", args.clients, jitter=False, budget=False, seed=args.seed),
        simulate("jitter", args.clients, jitter=True, budget=False, seed=args.seed),
        simulate("jitter + retry budget", args.clients, jitter=True, budget=True, seed=args.seed),
    ]
    base = runs[0]
    print(f"retry storm: {args.clients} clients, dependency down, seed schedule "
          f"(4 attempts, 2^n + U(0, 2^(n-1)) s), buckets of {BUCKET * 1000:.0f} ms")
    print(f"{'run':<24}{'retries':>9}{'peak/100ms':>12}{'p99/100ms':>11}{'load x':>8}"
          f"{'peak vs base':>14}{'retries vs base':>17}")
    for r in runs:
        print(f"{r.name:<24}{r.retries:>9}{r.peak_per_bucket:>12}{r.p99_per_bucket:>11}"
              f"{r.load_factor:>8.2f}{r.peak_per_bucket / base.peak_per_bucket:>14.3f}"
              f"{r.retries / base.retries:>17.3f}")
    return runs


if __name__ == "__main__":
    main()
