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

``--processes N`` measures instead how several worker processes share the dependency: the
same clients split over N processes, each with its own adaptive limiter adapting alone (what
Tidegate does), against one limiter for all of them in one process (what a cluster-wide
figure shared through Redis could at best do, without its round trips). Per phase: goodput,
p99, and the limits sampled (summed over the processes).

    .venv/bin/python bench/adaptive_limit.py [--phase-s 8] [--threads 40] [--processes 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
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


def _adaptive(args) -> dict:
    return {"timeout_ms": 5000, "deadline_ms": 10000,
            "bulkhead": {"mode": "adaptive", "min": 1, "max": 60, "initial": 10,
                         "max_wait_ms": args.wait_ms}}


def _worker(url: str, threads: int, args, phase, stop, out, idx: int) -> None:
    """One worker process: its own adaptive limiter, ``threads`` closed-loop clients."""
    policy = Policy(PolicyConfig.from_mapping("dep", _adaptive(args)), layers=LAYERS,
                    events=EventBus())
    http = httpx.Client(base_url=url, timeout=30,
                        limits=httpx.Limits(max_connections=threads + 8))
    ok: list[list[float]] = [[] for _ in args.capacities]
    limits: list[tuple[int, int]] = []

    def get() -> dict:
        r = http.get("/price")
        r.raise_for_status()
        return r.json()

    def client() -> None:
        while not stop.is_set():
            p = phase.value
            start = time.perf_counter()
            try:
                policy.call(get)
            except Exception:
                stop.wait(0.01)
                continue
            if phase.value == p:
                ok[p].append(time.perf_counter() - start)

    ts = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    while not stop.wait(args.phase_s / 4):
        limits.append((phase.value, policy.adaptive_limiter.limit))
    for t in ts:
        t.join(30)
    http.close()
    out.put((idx, ok, limits))


def run_processes(sim: Sim, n: int, clients: int, args,
                  ) -> tuple[list[tuple[int, float]], list[int]]:
    """``clients`` split over ``n`` processes, each adapting alone: (successes, p99) per
    phase over all of them, and the limits sampled 4x per phase, summed over processes."""
    sim.reset()
    ctx = multiprocessing.get_context("fork")
    phase, stop, out = ctx.Value("i", 0), ctx.Event(), ctx.Queue()
    sim.control(latency_ms=args.latency_ms, capacity=args.capacities[0])
    procs = [ctx.Process(target=_worker, args=(sim.url, clients // n, args, phase, stop,
                                               out, i)) for i in range(n)]
    for proc in procs:
        proc.start()
    for i, capacity in enumerate(args.capacities):
        sim.control(latency_ms=args.latency_ms, capacity=capacity)
        phase.value = i
        time.sleep(args.phase_s)
    stop.set()
    reports = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    ok = [sorted(x for _, per, _ in reports for x in per[i]) for i in range(len(args.capacities))]
    samples = [lim for _, _, lim in sorted(reports, key=lambda r: r[0])]
    summed = [sum(s[k][1] for s in samples) for k in range(min(map(len, samples)))]
    return [(len(v), p99(v)) for v in ok], summed


def main_processes(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim("dep", Path(tmp))
        try:
            clients = args.threads // args.processes * args.processes  # the same in both
            shared, shared_limits = run_processes(sim, 1, clients, args)
            alone, alone_limits = run_processes(sim, args.processes, clients, args)
        finally:
            sim.stop()
    caps = " -> ".join(map(str, args.capacities))
    print(f"dependency: {args.latency_ms:g} ms per request, capacity {caps} concurrent "
          f"({args.phase_s:g} s each); {clients} closed-loop clients; "
          f"wait for a slot {args.wait_ms:g} ms")
    print(f"{'limiters':<26}" + "".join(f"{'cap ' + str(c) + ' ok/s':>14}{'p99 ms':>9}"
                                        for c in args.capacities))
    rows = (("one for all clients", shared), (f"{args.processes} processes, each alone", alone))
    for label, phases in rows:
        print(f"{label:<26}" + "".join(f"{n / args.phase_s:>14.1f}{q * 1000:>9.0f}"
                                       for n, q in phases))
    print(f"limit sampled 4x per phase, one limiter: {shared_limits}")
    print(f"limits sampled 4x per phase, summed over {args.processes} processes: {alone_limits}")
    for i, c in enumerate(args.capacities):
        good = alone[i][0] / shared[i][0]
        lat = alone[i][1] / shared[i][1]
        print(f"capacity {c}: {args.processes} processes alone vs one limiter: goodput "
              f"{good:.2f}x, p99 {lat:.2f}x")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase-s", type=float, default=8)
    ap.add_argument("--threads", type=int, default=40)
    ap.add_argument("--latency-ms", type=float, default=100)
    ap.add_argument("--capacities", type=int, nargs=3, default=[20, 5, 15])
    ap.add_argument("--static", type=int, nargs="+", default=[3, 10, 25])
    ap.add_argument("--wait-ms", type=float, default=500)
    ap.add_argument("--processes", type=int, default=1,
                    help="> 1: N processes adapting alone vs one limiter for all clients")
    args = ap.parse_args()
    if args.processes > 1:
        return main_processes(args)
    common = {"timeout_ms": 5000, "deadline_ms": 10000}
    runs: dict[str, Policy] = {}
    for n in args.static:
        runs[f"static {n}"] = Policy(PolicyConfig.from_mapping("dep", {
            **common, "bulkhead": {"max_concurrent": n, "max_wait_ms": args.wait_ms}}),
            layers=LAYERS, events=EventBus())
    runs["adaptive"] = Policy(PolicyConfig.from_mapping("dep", _adaptive(args)), layers=LAYERS,
                              events=EventBus())
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
