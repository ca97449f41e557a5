"""Pipeline throughput: Tidegate's producer + resilient no-op task vs bare Celery.

Baseline: ``task.apply_async()`` of a plain ``@shared_task``. Tidegate: ``Producer.enqueue``
(validation, priority, headers, depth-aware throttle) of a ``resilient_task`` (idempotency
marks, delivery decision, the dependency's chain around the call). Same worker process, same
queue, runs alternated (A B C A B C ...) so drift on a shared machine hits all; throughput is
jobs from first publish to last completion; the median of the rounds is printed. Prints the
ratio per broker (target >= 0.9x) for the idempotent task, and for a non-idempotent one,
which also waits for its mark read before running (docs/delivery.md, "Cost").

    .venv/bin/python bench/pipeline_throughput.py [--jobs 2000] [--rounds 5]
        [--brokers redis amqp] [--redis-broker URL] [--amqp-broker URL] [--state URL]

``--state`` is flushed before each broker's run: point it (and ``--redis-broker``) at a private
redis-server on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from workers.installation import installation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tasks import COUNTER  # noqa: E402
from tidegate.stack import Worker, ensure_vhost, wait_until  # noqa: E402

BROKERS = {
    "redis": "redis://127.0.0.1:6379/8",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/tidegate_bench",
}
STATE_URL = "redis://127.0.0.1:6379/8"
KINDS = ("bare", "tidegate", "once")  # once: the non-idempotent resilient task


def _run(kind: str, jobs: int, app, producer, counter: redis.Redis) -> float:
    counter.set(COUNTER, 0)
    started = time.perf_counter()
    if kind == "bare":
        task = app.tasks["bench.plain_noop"]
        for i in range(jobs):
            task.apply_async((i,), queue="default")
    else:
        name = "bench.resilient_noop" if kind == "tidegate" else "bench.resilient_noop_once"
        for i in range(jobs):
            producer.enqueue(name, [i])
    wait_until(lambda: int(counter.get(COUNTER) or 0) >= jobs, 600, interval=0.01,
               message=f"{jobs} {kind} jobs")
    return jobs / (time.perf_counter() - started)


def bench_broker(name: str, url: str, jobs: int, rounds: int, tmp: Path,
                 state_url: str = STATE_URL) -> dict[str, float]:
    os.environ.update(TIDEGATE_BROKER_URL=url, TIDEGATE_REDIS_URL=state_url)
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=url, redis_url=state_url))
    app.loader.import_default_modules()
    import bench.tasks  # noqa: F401  (registers the bench tasks in this process)

    producer = Producer(app)
    counter = redis.Redis.from_url(state_url, socket_timeout=5)
    counter.flushdb()
    if name == "amqp":
        from kombu import Connection

        with Connection(url, connect_timeout=5) as conn:
            installation(app).topology.declare(conn)
            conn.default_channel.queue_purge("default")
    env = {"TIDEGATE_BROKER_URL": url, "TIDEGATE_REDIS_URL": state_url,
           "PYTHONPATH": str(ROOT)}
    worker = Worker("default", env, tmp, concurrency=8, extra=("-I", "bench.tasks"))
    worker.wait_ready(90)
    try:
        for kind in KINDS:  # warm every path up
            _run(kind, min(300, jobs), app, producer, counter)
        rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(rounds):
            for kind in KINDS:
                rates[kind].append(_run(kind, jobs, app, producer, counter))
    finally:
        worker.stop()
        app.close()
    return {k: statistics.median(v) for k, v in rates.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--brokers", nargs="*", default=list(BROKERS))
    parser.add_argument("--redis-broker", default=BROKERS["redis"])
    parser.add_argument("--amqp-broker", default=BROKERS["amqp"])
    parser.add_argument("--state", default=STATE_URL, help="flushed: never a shared database")
    args = parser.parse_args(argv)
    urls = {"redis": args.redis_broker, "amqp": args.amqp_broker}
    if "amqp" in args.brokers:
        ensure_vhost(urls["amqp"].rsplit("/", 1)[-1] or "/")
    print(f"pipeline throughput: {args.jobs} no-op jobs per run, {args.rounds} rounds A/B/C, "
          "1 worker (8 threads), median jobs/s")
    print(f"{'broker':<8}{'bare Celery':>14}{'Tidegate':>12}{'ratio':>9}"
          f"{'not idempotent':>17}{'ratio':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.brokers:
            r = bench_broker(name, urls[name], args.jobs, args.rounds, Path(tmp), args.state)
            print(f"{name:<8}{r['bare']:>14.0f}{r['tidegate']:>12.0f}"
                  f"{r['tidegate'] / r['bare']:>9.2f}x{r['once']:>17.0f}"
                  f"{r['once'] / r['bare']:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
