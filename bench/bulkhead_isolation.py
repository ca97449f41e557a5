"""Bulkhead isolation: search keeps its throughput while the payments provider hangs.

Four runs in one go, each pushing the same mix (search jobs and payments jobs) with the same
total worker threads:

- bulkheads, no fault: one worker per queue (payments, search), the baseline;
- bulkheads, payments hangs: the payments simulator never answers;
- shared queue, no fault: both kinds on one queue, one worker with all the threads;
- shared queue, payments hangs.

It prints search throughput for each, and the ratio of the fault run to its no-fault run
(target with bulkheads >= 0.95x). Tidegate's chain (80 ms per-attempt timeout, 200 ms deadline,
breaker) still guards the shared-queue case; the difference is what the queue bulkhead adds.

    .venv/bin/python bench/bulkhead_isolation.py [--search-jobs 400] [--payment-jobs 400]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tidegate.stack import Sim, Worker, wait_until, write_policy  # noqa: E402

BROKER = "redis://127.0.0.1:6379/8"
STATE = "redis://127.0.0.1:6379/7"
THREADS = 8


def one_run(label: str, *, shared: bool, hang: bool, jobs: tuple[int, int], sims, policy: Path,
            tmp: Path) -> float:
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    for r in (redis.Redis.from_url(BROKER), redis.Redis.from_url(STATE)):
        r.flushdb()
    for sim in sims.values():
        sim.reset()
    if hang:
        sims["payments"].control(mode="hanging", hang_s=30)
    settings = load_settings(broker_url=BROKER, redis_url=STATE, policy_file=policy)
    app = create_app(settings)
    producer = Producer(app)
    env = {"TIDEGATE_BROKER_URL": BROKER, "TIDEGATE_REDIS_URL": STATE,
           "TIDEGATE_POLICY_FILE": str(policy)}
    if shared:
        workers = [Worker("default", env, tmp, concurrency=THREADS)]
    else:
        workers = [Worker("payments", env, tmp, concurrency=THREADS // 2),
                   Worker("search", env, tmp, concurrency=THREADS // 2)]
    for w in workers:
        w.wait_ready(90)
    n_search, n_pay = jobs
    queue = "default" if shared else None
    try:
        def pay() -> None:
            for i in range(n_pay):
                producer.enqueue("payments.charge", [f"acct-{i}", 100], idempotency_key=f"p{i}",
                                 queue=queue, priority="high")

        payer = threading.Thread(target=pay)
        started = time.perf_counter()
        payer.start()
        for i in range(n_search):
            producer.enqueue("search.index", [f"doc-{i}"], queue=queue, priority="high")
            if i % 4 == 0:
                time.sleep(0)
        wait_until(lambda: sims["search"].ledger()["applied"] >= n_search, 900, interval=0.05,
                   message=f"{label}: {n_search} search jobs")
        rate = n_search / (time.perf_counter() - started)
        payer.join()
    finally:
        for w in workers:
            w.stop(timeout=5)
        app.close()
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search-jobs", type=int, default=400)
    parser.add_argument("--payment-jobs", type=int, default=400)
    args = parser.parse_args(argv)
    jobs = (args.search_jobs, args.payment_jobs)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        sims = {n: Sim(n, tmp) for n in ("payments", "search", "email", "pricing")}
        policy = write_policy(sims, tmp / "policy.toml")
        try:
            rates = {}
            for label, shared, hang in [("bulkheads, no fault", False, False),
                                        ("bulkheads, payments hangs", False, True),
                                        ("shared queue, no fault", True, False),
                                        ("shared queue, payments hangs", True, True)]:
                rates[label] = one_run(label, shared=shared, hang=hang, jobs=jobs, sims=sims,
                                       policy=policy, tmp=tmp)
        finally:
            for sim in sims.values():
                sim.stop()
    print(f"bulkhead isolation: {args.search_jobs} search + {args.payment_jobs} payments jobs, "
          f"{THREADS} worker threads in all; search jobs/s")
    print(f"{'run':<32}{'search/s':>10}{'vs no fault':>13}")
    for label, rate in rates.items():
        base = rates[f"{label.split(',')[0]}, no fault"]
        print(f"{label:<32}{rate:>10.0f}{rate / base:>12.2f}x")


if __name__ == "__main__":
    main()
