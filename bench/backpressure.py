"""Backpressure: a naive ``send_task`` producer against Tidegate's Producer, in the same run.

One real Celery worker (``-Q search -c 1``) drains the ``search`` queue; each task calls a
``tidegate downstream`` simulator with fixed latency, so its capacity C (tasks/s) is measured
first. Then:

1. flood at >= 5x C for T seconds, naive producer, then Tidegate's: max depth, depth over
   time, worker utilisation (tasks done / (C x T));
2. 2x overload split evenly over the four priority classes, same two producers: served
   share per class, goodput (tasks done / (C x T)) and p99 wait (enqueue -> effect applied).

Figures are printed with ratios, because this machine is shared: absolute rates are noise.

    .venv/bin/python bench/backpressure.py            # ~1.5 minutes, 8 s phases
    .venv/bin/python bench/backpressure.py --full     # 30 s phases, as the issue asks
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resilience.errors import Backpressure  # noqa: E402
from resilience.shedding import Priority  # noqa: E402
from tests.support.procs import Sim, Worker, wait_until  # noqa: E402

QUEUE = "search"
TASK = "search.index"


def policy_with(sim_url: str, low: int, high: int, tmp: Path) -> Path:
    text = (ROOT / "workers" / "policy.toml").read_text().replace(
        'url = "http://127.0.0.1:8102"', f'url = "{sim_url}"')
    path = tmp / "policy-bench.toml"
    path.write_text(text + f"\n[backpressure.{QUEUE}]\nlow_watermark = {low}\n"
                           f"high_watermark = {high}\nmax_wait_ms = 100\n")
    return path


class Rig:
    """Broker, simulator, worker and the two producers."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from producers import Producer
        from workers.application import create_app
        from workers.depth import probe_for
        from workers.settings import load_settings

        self.args = args
        self.sim = Sim("search", tmp)
        self.sim.control(mode="slow", latency_ms=args.latency_ms)
        self.policy = policy_with(self.sim.url, args.low, args.high, tmp)
        self.env = {"TIDEGATE_BROKER_URL": args.broker_url, "TIDEGATE_REDIS_URL": args.redis_url,
                    "TIDEGATE_POLICY_FILE": str(self.policy)}
        self.settings = load_settings(broker_url=args.broker_url, redis_url=args.redis_url,
                                      policy_file=self.policy)
        self.app = create_app(self.settings)
        self.producer = Producer(self.app)
        self.probe = probe_for(self.settings)
        self.tmp = tmp
        self.worker: Worker | None = None

    def purge(self) -> None:
        redis.Redis.from_url(self.args.broker_url).flushdb()
        redis.Redis.from_url(self.args.redis_url).flushdb()

    def start_worker(self) -> None:
        self.worker = Worker(QUEUE, self.env, self.tmp, concurrency=1).wait_ready(90)

    def stop_worker(self) -> None:
        if self.worker:
            self.worker.stop()
            self.worker = None

    def applied(self) -> int:
        return self.sim.ledger()["applied"]

    def depth(self) -> int:
        return self.probe.depth(QUEUE).ready

    def naive(self, doc: str, priority: Priority) -> bool:
        from workers.topology import broker_priority

        self.app.send_task(TASK, args=[doc], queue=QUEUE,
                           priority=broker_priority(priority, self.settings.transport))
        return True

    def tidegate(self, doc: str, priority: Priority) -> bool:
        try:
            self.producer.enqueue(TASK, [doc], priority=priority, max_wait_s=0.1)
            return True
        except Backpressure:
            return False

    def close(self) -> None:
        self.stop_worker()
        self.sim.stop()
        self.app.close()


def measure_capacity(rig: Rig, seconds: float) -> float:
    """Tasks/s of one worker with a full queue."""
    rig.purge()
    for i in range(int(seconds * 200)):
        rig.naive(f"cap-{i}", Priority.HIGH)
    rig.sim.reset()
    rig.sim.control(mode="slow", latency_ms=rig.args.latency_ms)
    rig.start_worker()
    wait_until(lambda: rig.applied() > 0, 60, message="first task done")
    start_n, t0 = rig.applied(), time.monotonic()
    time.sleep(seconds)
    rate = (rig.applied() - start_n) / (time.monotonic() - t0)
    rig.stop_worker()
    rig.purge()
    return rate


def offer(rig: Rig, send, rate: float, seconds: float, mix: list[Priority], phase: str,
          threads: int = 8) -> tuple[dict, list[int]]:
    """Offer ``rate`` jobs/s for ``seconds`` from ``threads`` paced threads; sample depth."""
    counts = {p: {"offered": 0, "admitted": 0} for p in Priority}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    per_thread = rate / threads

    def run(k: int) -> None:
        n = 0
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            if now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            next_at += 1 / per_thread
            p = mix[(n * threads + k) % len(mix)]
            n += 1
            ok = send(f"{phase}|{p.name}|{k}-{n}|{time.time():.4f}", p)
            with lock:
                counts[p]["offered"] += 1
                counts[p]["admitted"] += ok

    pool = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    samples: list[int] = []
    while time.monotonic() < stop_at:
        samples.append(rig.depth())
        time.sleep(0.25)
    for t in pool:
        t.join(30)
    return counts, samples


def phase(rig: Rig, name: str, send, rate: float, seconds: float, mix: list[Priority],
          capacity: float) -> dict:
    rig.purge()
    rig.sim.reset()
    rig.sim.control(mode="slow", latency_ms=rig.args.latency_ms)
    rig.start_worker()
    before = rig.applied()
    counts, samples = offer(rig, send, rate, seconds, mix, name)
    done = rig.applied() - before
    effects = rig.sim.ledger()["effects"]
    rig.stop_worker()
    waits: dict[str, list[float]] = {p.name: [] for p in Priority}
    served: dict[str, int] = {p.name: 0 for p in Priority}
    for e in effects.values():
        doc = str(e["payload"].get("doc_id", ""))
        parts = doc.split("|")
        if len(parts) == 4 and parts[0] == name:
            waits[parts[1]].append(e["applied_at"] - float(parts[3]))
            served[parts[1]] += 1
    return {"counts": counts, "samples": samples, "done": done,
            "utilisation": done / (capacity * seconds), "waits": waits, "served": served,
            "max_depth": max(samples) if samples else 0}


def p99(values: list[float]) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100)[98]


def series(samples: list[int], every: int = 4) -> str:
    return " ".join(str(s) for s in samples[::every])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="30 s phases (default 8 s)")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--latency-ms", type=float, default=15.0,
                        help="simulator latency per call (search.index makes two calls)")
    parser.add_argument("--low", type=int, default=30)
    parser.add_argument("--high", type=int, default=60)
    parser.add_argument("--flood", type=float, default=5.0, help="flood factor x capacity")
    parser.add_argument("--broker-url", default=os.environ.get("BENCH_BROKER_URL",
                                                               "redis://127.0.0.1:6379/8"))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/9"))
    args = parser.parse_args()
    seconds = args.seconds or (30.0 if args.full else 8.0)

    subprocess.run([str(ROOT / "scripts" / "services.sh"), "redis"], check=True, timeout=120)
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as tmp:
        rig = Rig(args, Path(tmp))
        try:
            capacity = measure_capacity(rig, min(5.0, seconds))
            print(f"worker capacity C = {capacity:.1f} tasks/s (1 worker, -c 1, "
                  f"{args.latency_ms:.0f} ms per downstream call); watermarks "
                  f"low={args.low} high={args.high}; phases of {seconds:.0f} s")
            flood_rate = args.flood * capacity
            mix = [Priority.LOW, Priority.MEDIUM, Priority.HIGH]
            print(f"\n== flood at {args.flood:.0f}x capacity ({flood_rate:.0f} jobs/s offered)")
            res = {}
            for label, send in (("naive", rig.naive), ("tidegate", rig.tidegate)):
                res[label] = r = phase(rig, f"flood-{label}", send, flood_rate, seconds, mix,
                                       capacity)
                admitted = sum(c["admitted"] for c in r["counts"].values())
                offered = sum(c["offered"] for c in r["counts"].values())
                print(f"{label:9s} max depth {r['max_depth']:6d} "
                      f"({r['max_depth'] / args.high:5.2f}x high watermark)  utilisation "
                      f"{r['utilisation']:6.1%}  admitted {admitted}/{offered}")
                print(f"{'':9s} depth every 1 s: {series(r['samples'])}")
            n, t = res["naive"], res["tidegate"]
            print(f"ratio     max depth naive/tidegate = "
                  f"{n['max_depth'] / max(1, t['max_depth']):.1f}x; utilisation "
                  f"tidegate/naive = {t['utilisation'] / max(1e-9, n['utilisation']):.2f}")

            print(f"\n== 2x overload, even mix of the four classes ({2 * capacity:.0f} jobs/s)")
            mix4 = list(Priority)
            for label, send in (("naive", rig.naive), ("tidegate", rig.tidegate)):
                r = phase(rig, f"over-{label}", send, 2 * capacity, seconds, mix4, capacity)
                print(f"{label:9s} goodput {r['done'] / seconds:6.1f}/s "
                      f"({r['utilisation']:6.1%} of capacity), max depth {r['max_depth']}")
                for p in Priority:
                    c = r["counts"][p]
                    w = p99(r["waits"][p.name])
                    print(f"{'':9s} {p.name:8s} offered {c['offered']:5d} admitted "
                          f"{c['admitted'] / max(1, c['offered']):6.1%} served in-run "
                          f"{r['served'][p.name] / max(1, c['offered']):6.1%}  p99 wait "
                          f"{'-' if w is None else f'{w:6.2f} s'}")
        finally:
            rig.close()
            rig.purge()


if __name__ == "__main__":
    main()
