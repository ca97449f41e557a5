"""Replay throughput against raw SQS receive+delete, on one moto endpoint, at the same depth.

Baseline: a bare loop of ReceiveMessage(10) + DeleteMessageBatch over a queue of N messages
(the most any SQS consumer can do). Replay: the real replayer (breaker read, health probe,
slow start, depth check, publish to Redis with the original key, delete after publish) over
a deferral queue of N entries. Each queue is filled just before its own run, so both start at
the same depth with nothing else in the endpoint. One run, ratio printed (target >= 0.8).

    .venv/bin/python bench/replay.py [--messages 1000] [--redis redis://127.0.0.1:6379/9]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import uuid
from pathlib import Path

import redis

from resilience.fallback import DeferredRequest
from tidegate.stack import ROOT, MotoServer, Sim
from workers.sqs_deferral import SQS_MAX_BATCH, encode_entry


def fill(client, url: str, bodies: list[str]) -> None:
    for start in range(0, len(bodies), SQS_MAX_BATCH):
        chunk = bodies[start : start + SQS_MAX_BATCH]
        client.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(chunk)])


def raw_drain(client, url: str, n: int) -> float:
    t0 = time.perf_counter()
    done = 0
    while done < n:
        messages = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                          VisibilityTimeout=60).get("Messages", [])
        if messages:
            client.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(messages)])
            done += len(messages)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9",
                        help="Redis database used as broker and state store (flushed)")
    opts = parser.parse_args()
    n = opts.messages

    tmp = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    moto, sim = MotoServer(tmp), Sim("email", tmp)
    try:
        text = (ROOT / "workers" / "policy.toml").read_text()
        text = re.sub(r'(\[dependencies\.email\][^\[]*?url = )"[^"]*"', rf'\1"{sim.url}"',
                      text, flags=re.S)
        (tmp / "policy.toml").write_text(text)
        redis.Redis.from_url(opts.redis).flushdb()

        from workers.application import create_app
        from workers.replayer import ReplayConfig, build_replayer
        from workers.settings import load_settings

        settings = load_settings(broker_url=opts.redis, redis_url=opts.redis,
                                 policy_file=tmp / "policy.toml", sqs_endpoint_url=moto.url,
                                 aws_access_key_id="bench", aws_secret_access_key="bench",
                                 deferral_queue_prefix=f"b{uuid.uuid4().hex[:6]}-")
        app = create_app(settings)
        cfg = ReplayConfig.from_settings(settings, max_queue_depth=10 * n, idle_wait_s=0)
        replayer = build_replayer(app, "email", cfg)
        store = replayer.store
        client = store.client

        bodies = [encode_entry(DeferredRequest(
            "email", "email.send", (f"user{i}@example.com", "subject"), {"body": "x" * 200},
            idempotency_key=f"bench-{i}", priority=2, reason="CircuitOpen: email"))
            for i in range(n)]

        raw_url = client.create_queue(QueueName=f"raw-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        fill(client, raw_url, bodies)
        raw_s = raw_drain(client, raw_url, n)
        client.delete_queue(QueueUrl=raw_url)

        fill(client, store.resolve().url, bodies)
        t0 = time.perf_counter()
        stats = replayer.drain()
        replay_s = time.perf_counter() - t0
        published = redis.Redis.from_url(opts.redis).llen("email:6")  # MEDIUM on Redis
        assert stats.published == n == stats.deleted, stats.as_dict()
        assert published == n, published

        raw_rate, replay_rate = n / raw_s, n / replay_s
        print(f"raw receive+delete : {raw_rate:8.1f} msg/s  ({raw_s:.1f} s for {n})")
        print(f"replayer           : {replay_rate:8.1f} msg/s  ({replay_s:.1f} s for {n}, "
              f"published and deleted {stats.deleted})")
        print(f"ratio replay/raw   : {replay_rate / raw_rate:.2f}  (target >= 0.8)")
        print(json.dumps({"messages": n, "raw_per_s": round(raw_rate, 1),
                          "replay_per_s": round(replay_rate, 1),
                          "ratio": round(replay_rate / raw_rate, 3)}))
        app.close()
    finally:
        sim.stop()
        moto.stop()
        redis.Redis.from_url(opts.redis).flushdb()


if __name__ == "__main__":
    main()
