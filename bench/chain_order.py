"""The chain's order against the seed's, on the same failure storm (fake clock, seeded).

One dependency, one caller making a call every 10 ms of simulated time for 30 s. From 5 s to
15 s every attempt times out (80 ms); otherwise it answers in 10 ms. Both chains are real
:class:`~resilience.policy.Policy` objects on the shipped payments/pricing numbers (80 ms per
attempt, 200 ms in all, two attempts in the call, breaker: 50% over 10 s, at least 10 calls,
open 2 s here so recovery shows), with a default fallback; only ``layers`` differs:

- default: rate_limit > shedding > fallback > deadline > retry > breaker > bulkhead > timeout
- seed:    rate_limit > deadline > breaker > retry > bulkhead > timeout > fallback
  (the seed's RateLimiter -> Timeout -> CircuitBreaker -> Retry -> Bulkhead -> Fallback, with
  its outer Timeout as our deadline and the per-attempt timeout next to the call)

It prints, per order: attempts that reached the failing dependency during the storm, the time
from the storm's start until the breaker first refused, the time from the storm's end until
calls were answered by the dependency again, and what callers saw (answers, fallbacks,
errors, mean latency).

    .venv/bin/python bench/chain_order.py
"""

from __future__ import annotations

import random

from resilience.breaker import BreakerConfig
from resilience.clock import FakeClock
from resilience.errors import CircuitOpen, TidegateError
from resilience.policy import Policy
from resilience.policy_config import FallbackSpec, PolicyConfig

ORDERS = {
    "default": None,
    "seed": ("rate_limit", "deadline", "breaker", "retry", "bulkhead", "timeout", "fallback"),
}
STEP, END, STORM = 0.01, 30.0, (5.0, 15.0)


def run(layers: tuple[str, ...] | None, seed: int = 7) -> dict[str, float]:
    clock = FakeClock(0.0)
    config = PolicyConfig(name="dep", idempotent=True, layers=layers,
                          breaker=BreakerConfig(open_duration=2.0),
                          fallback=FallbackSpec(kind="default", value="fallback"))
    policy = Policy(config, clock=clock, rng=random.Random(seed))
    stats = {"reached_in_storm": 0, "answers": 0, "fallbacks": 0, "errors": 0}
    first_refusal = recovered = None
    latency = 0.0
    calls = 0

    def dependency() -> str:
        storm = STORM[0] <= clock.now() < STORM[1]
        if storm:
            stats["reached_in_storm"] += 1
            clock.advance(0.08)
            raise TimeoutError("timed out")
        clock.advance(0.01)
        return "answer"

    def refused(exc: BaseException) -> bool:
        return isinstance(exc, CircuitOpen) or isinstance(exc.__cause__, CircuitOpen)

    while clock.now() < END:
        start = clock.now()
        calls += 1
        try:
            result = policy.call(dependency)
        except TidegateError as exc:
            stats["errors"] += 1
            if first_refusal is None and refused(exc) and start >= STORM[0]:
                first_refusal = start - STORM[0]
        else:
            if result == "answer":
                stats["answers"] += 1
                if recovered is None and start >= STORM[1]:
                    recovered = start - STORM[1]
            else:
                stats["fallbacks"] += 1
        if first_refusal is None and start >= STORM[0] and policy.breaker.state.value != \
                "closed":
            first_refusal = clock.now() - STORM[0]
        latency += clock.now() - start
        clock.advance(STEP)
    return {**stats, "calls": calls, "open_after_s": first_refusal or float("nan"),
            "recovered_after_s": recovered or float("nan"),
            "mean_latency_ms": 1000 * latency / calls}


def main() -> None:
    results = {name: run(layers) for name, layers in ORDERS.items()}
    keys = ("calls", "reached_in_storm", "open_after_s", "recovered_after_s", "answers",
            "fallbacks", "errors", "mean_latency_ms")
    print(f"{'':22}" + "".join(f"{name:>12}" for name in results) + f"{'seed/default':>14}")
    for key in keys:
        a, b = results["default"][key], results["seed"][key]
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"{key:22}" + "".join(f"{results[n][key]:>12.2f}" if isinstance(
            results[n][key], float) else f"{results[n][key]:>12}" for n in results)
              + f"{ratio:>14}")


if __name__ == "__main__":
    main()
