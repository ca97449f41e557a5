"""Enqueue throughput: ``Producer.enqueue`` and ``Producer.enqueue_many`` vs a ``send_task`` loop.

Baseline: ``app.send_task("search.index", ...)`` in a loop, as a plain Celery client publishes
(on RabbitMQ with the shipped publisher confirms, so each publish waits for its confirm).
Against it, in the same run: ``Producer.enqueue`` in a loop, and ``Producer.enqueue_many`` in
batches of 1, 10, 100 and 1,000 jobs (mixed priorities). Every job of every variant passes the
shipped producer's checks (validation, deferral gate, depth throttle with watermarks set out
of reach: no consumer drains the queue here). ``batch 100 send_task`` is the batch of 100
with its messages built by ``send_task`` per job, as before the message templates
(producers/messages.py): the before figure in the same run. A last column, ``send_task no
I/O``, runs Celery's own per-message work with the broker write dropped: the ceiling of a
batch that builds every message through ``send_task``. Variants alternate round by round (A B C ...,
the queue emptied before each run) so drift on a shared machine hits all; the median rate of
the rounds is printed with its ratio to the baseline. Targets (issue 19): a batch of 100 at
>= 3x the loop on Redis and >= 5x on RabbitMQ with confirms.

    .venv/bin/python bench/enqueue.py [--jobs 2000] [--rounds 3] [--brokers redis amqp]
        [--redis-broker URL] [--amqp-broker URL] [--state URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tidegate.stack import ensure_vhost  # noqa: E402

QUEUE, TASK = "search", "search.index"
BATCHES = (1, 10, 100, 1000)
TARGETS = {"redis": 3.0, "amqp": 5.0}  # batch of 100 vs the send_task loop
PRIORITIES = ("critical", "high", "medium", "low")


def _purge(app, broker: str) -> None:
    from kombu import Connection

    from workers.installation import installation
    from workers.topology import redis_priority_lists

    if broker == "redis":
        with app.connection_for_write() as conn:
            client = conn.default_channel.client
            client.delete(*redis_priority_lists(QUEUE))
        return
    with Connection(app.conf.broker_url, connect_timeout=5) as conn:
        installation(app).topology.declare(conn)
        conn.default_channel.queue_purge(QUEUE)


def _variants(app, producer, jobs: int):
    from producers import Job

    options = producer._publish_options()

    def send_task_loop() -> None:
        for i in range(jobs):
            app.send_task(TASK, args=[f"d{i}"], queue=QUEUE, **options)

    def enqueue_loop() -> None:
        for i in range(jobs):
            producer.enqueue(TASK, [f"d{i}"], priority=PRIORITIES[i % 4])

    def batch(size: int):
        def run() -> None:
            for start in range(0, jobs, size):
                results = producer.enqueue_many(
                    [Job(TASK, [f"d{i}"], priority=PRIORITIES[i % 4])
                     for i in range(start, min(jobs, start + size))])
                bad = [r for r in results if getattr(r, "state", None) != "queued"]
                if bad:
                    raise SystemExit(f"batch of {size}: {len(bad)} jobs not queued: {bad[0]}")
        return run

    def batch_send_task(size: int):
        """The batch as before its messages came from a template: ``send_task`` per job."""
        run = batch(size)

        def without_templates() -> None:
            import producers.publishing as pp

            real = pp.fast_path_usable
            pp.fast_path_usable = lambda app: False
            try:
                run()
            finally:
                pp.fast_path_usable = real
        return without_templates

    def build_only() -> None:
        """Celery's own per-message work (send_task -> create_task_message -> kombu publish
        -> task-sent event) with the broker write dropped: the floor a batch that keeps
        Celery's messages cannot go below."""
        with app.producer_or_acquire() as kombu_producer:
            kombu_producer._batch_local.current = _Drop()
            try:
                for i in range(jobs):
                    app.send_task(TASK, args=[f"d{i}"], queue=QUEUE, producer=kombu_producer,
                                  **options)
            finally:
                del kombu_producer._batch_local.current

    return {"send_task loop": send_task_loop, "enqueue loop": enqueue_loop,
            **{f"batch {n}": batch(n) for n in BATCHES},
            "batch 100 send_task": batch_send_task(100), "send_task no I/O": build_only}


class _Drop:
    """Takes the place of kombu's publish-batch state on a producer and drops each message."""

    def publish(self, channel, message, **kwargs) -> None:
        return None


def bench_broker(broker: str, url: str, state: str, jobs: int, rounds: int,
                 policy: Path) -> dict[str, float]:
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=url, redis_url=state, policy_file=policy))
    app.loader.import_default_modules()
    producer = Producer(app)
    variants = _variants(app, producer, jobs)
    try:
        # warm every path up (connections, declarations, imports)
        for run in _variants(app, producer, min(jobs, 200)).values():
            _purge(app, broker)
            run()
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in variants.items():
                _purge(app, broker)
                started = time.perf_counter()
                run()
                rates[name].append(jobs / (time.perf_counter() - started))
        _purge(app, broker)
    finally:
        app.close()
    return {name: statistics.median(v) for name, v in rates.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--brokers", nargs="*", default=["redis", "amqp"])
    parser.add_argument("--redis-broker", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--amqp-broker", default="amqp://guest:guest@127.0.0.1:5672/tidegate_bench")
    parser.add_argument("--state", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args(argv)
    urls = {"redis": args.redis_broker, "amqp": args.amqp_broker}
    print(f"enqueue throughput: {args.jobs} {TASK} jobs per run, {args.rounds} rounds "
          "alternated, no consumer, median jobs/s (ratio to the send_task loop)")
    names = ["send_task loop", "enqueue loop", *(f"batch {n}" for n in BATCHES),
             "batch 100 send_task", "send_task no I/O"]
    print(f"{'broker':<8}" + "".join(f"{n:>20}" for n in names))
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.toml"
        policy.write_text((ROOT / "workers" / "policy.toml").read_text()
                          + "\n[backpressure]\nlow_watermark = 10000000\n"
                            "high_watermark = 20000000\n")
        verdicts = []
        for broker in args.brokers:
            if broker == "amqp":
                ensure_vhost(urls[broker].rsplit("/", 1)[-1] or "/")
            r = bench_broker(broker, urls[broker], args.state, args.jobs, args.rounds, policy)
            base = r["send_task loop"]
            print(f"{broker:<8}" + "".join(
                f"{f'{r[n]:.0f} ({r[n] / base:.2f}x)':>20}" for n in names), flush=True)
            ratio, target = r["batch 100"] / base, TARGETS[broker]
            verdicts.append(f"{broker}: batch of 100 at {ratio:.2f}x the send_task loop "
                            f"(target >= {target:.0f}x): " + (
                                "met" if ratio >= target else
                                f"missed by {target - ratio:.2f}x ({ratio / target:.0%} of it)")
                            + f"; with send_task per job (before the templates) "
                            f"{r['batch 100 send_task'] / base:.2f}x, which Celery's own "
                            f"message building capped at {r['send_task no I/O'] / base:.2f}x")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
