"""Adaptive concurrency limit vs static bulkheads, while the dependency's capacity changes.

The simulator serves ``--latency-ms`` per request up to its capacity; above it latency
stretches by in_flight/capacity and 503s appear (tidegate/downstream.py's capacity model).
Its capacity goes through three phases (default 20 -> 5 -> 15 concurrent, the issue's
40 -> 10 -> 30 halved so a shared 2-core machine can drive it), and ``--threads`` closed-loop
clients (more than any capacity) call it throughout, through one policy per run: static
bulkheads too low, about right and too high (default 3, 10, 25) and the adaptive limit
(min 1, max 60, initial 10). Every run waits up to ``--wait-ms`` for a slot. Per phase:
goodput (successful calls per second) and p99 latency of the successful calls, as the caller
saw them (wait for a slot included). Target (issue 16): adaptive goodput >= 0.9x the best
static limit of each phase and p99 <= 1.5x that limit's p99, in every phase.

Each run uses deadline, bulkhead or adaptive limit, and timeout only (a breaker opening on
overload errors would blur what the limit does).

    .venv/bin/python bench/adaptive_limit.py [--phase-s 8] [--threads 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resilience.events import EventBus  # noqa: E402
from resilience.policy import Policy, PolicyConfig  # noqa: E402
from tidegate.stack import Sim  # noqa: E402

LAYERS = ("deadline", "bulkhead", "adaptive_limit", "timeout")


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100)[98]


def one_run(sim: Sim, policy: Policy, capacities: list[int], args) -> list[tuple[int, float]]:
    """(successes, p99) per phase."""
    sim.reset()
    http = httpx.Client(base_url=sim.url, timeout=30,
                        limits=httpx.Limits(max_connections=args.threads + 8))
    phase = [0]
    ok: list[list[float]] = [[] for _ in capacities]
    stop = threading.Event()

    def get() -> dict:
        r = http.get("/price")
        r.raise_for_status()
        return r.json()

    def client() -> None:
        while not stop.is_set():
            p = phase[0]
            start = time.perf_counter()
            try:
                policy.call(get)
            except Exception:
                stop.wait(0.01)  # refused or failed: a short pause, as a client would
                continue
            if phase[0] == p:
                ok[p].append(time.perf_counter() - start)

    sim.control(latency_ms=args.latency_ms, capacity=capacities[0])
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for i, capacity in enumerate(capacities):
        sim.control(latency_ms=args.latency_ms, capacity=capacity)
        phase[0] = i
        time.sleep(args.phase_s)
    stop.set()
    for t in threads:
        t.join(30)
    http.close()
    return [(len(v), p99(v)) for v in ok]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase-s", type=float, default=8)
    ap.add_argument("--threads", type=int, default=40)
    ap.add_argument("--latency-ms", type=float, default=100)
    ap.add_argument("--capacities", type=int, nargs=3, default=[20, 5, 15])
    ap.add_argument("--static", type=int, nargs="+", default=[3, 10, 25])
    ap.add_argument("--wait-ms", type=float, default=500)
    args = ap.parse_args()
    common = {"timeout_ms": 5000, "deadline_ms": 10000}
    runs: dict[str, Policy] = {}
    for n in args.static:
        runs[f"static {n}"] = Policy(PolicyConfig.from_mapping("dep", {
            **common, "bulkhead": {"max_concurrent": n, "max_wait_ms": args.wait_ms}}),
            layers=LAYERS, events=EventBus())
    runs["adaptive"] = Policy(PolicyConfig.from_mapping("dep", {
        **common, "bulkhead": {"mode": "adaptive", "min": 1, "max": 60, "initial": 10,
                               "max_wait_ms": args.wait_ms}}), layers=LAYERS, events=EventBus())
    results: dict[str, list[tuple[int, float]]] = {}
    limits: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim("dep", Path(tmp))
        try:
            for label, policy in runs.items():
                if label == "adaptive":
                    sampler_stop = threading.Event()
                    lim = policy.adaptive_limiter

                    def sample(lim=lim, stop=sampler_stop) -> None:
                        while not stop.wait(args.phase_s / 4):
                            limits.append(lim.limit)

                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                results[label] = one_run(sim, policy, args.capacities, args)
                if label == "adaptive":
                    sampler_stop.set()
        finally:
            sim.stop()
    caps = " -> ".join(map(str, args.capacities))
    print(f"dependency: {args.latency_ms:g} ms per request, capacity {caps} concurrent "
          f"({args.phase_s:g} s each); {args.threads} closed-loop clients; "
          f"wait for a slot {args.wait_ms:g} ms")
    print(f"{'policy':<12}" + "".join(f"{'cap ' + str(c) + ' ok/s':>14}{'p99 ms':>9}"
                                      for c in args.capacities))
    for label, phases in results.items():
        print(f"{label:<12}" + "".join(f"{n / args.phase_s:>14.1f}{q * 1000:>9.0f}"
                                       for n, q in phases))
    print(f"adaptive limit sampled 4x per phase: {limits}")
    verdicts = []
    for i, c in enumerate(args.capacities):
        best = max((lbl for lbl in results if lbl != "adaptive"),
                   key=lambda lbl: results[lbl][i][0])
        bn, bq = results[best][i]
        an, aq = results["adaptive"][i]
        good, lat = an / bn, aq / bq
        verdicts.append(good >= 0.9 and lat <= 1.5)
        print(f"capacity {c}: best static is {best}; adaptive goodput {good:.2f}x "
              f"(target >= 0.9x), p99 {lat:.2f}x (target <= 1.5x): "
              f"{'met' if verdicts[-1] else 'missed'}")
    print(f"targets met in {sum(verdicts)} of {len(verdicts)} phases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
