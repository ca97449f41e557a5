"""A gentle, steady stream of mixed jobs so a freshly started pipeline has work to show."""

from __future__ import annotations

import itertools
import random
import time
import uuid

from producers import Producer
from resilience.errors import TidegateError
from workers.installation import DEFAULT_APP, load_app

JOBS = (
    ("payments.charge", "critical", lambda i: ([f"acct-{i % 50}", 500 + i % 900], {})),
    ("search.index", "high", lambda i: ([f"doc-{i}"], {"body": {"title": f"document {i}"}})),
    ("email.send", "medium", lambda i: ([f"user{i % 200}@example.test", f"receipt {i}"], {})),
)


def run(rate: float, count: int | None = None) -> None:
    """Enqueue ``rate`` jobs per second (``count`` in all, or until interrupted)."""
    producer = Producer(load_app(DEFAULT_APP))  # the example's tasks, whatever TIDEGATE_APP says
    rng = random.Random()
    interval = 1.0 / rate
    for i in itertools.count() if count is None else range(count):
        task, priority, make = rng.choice(JOBS)
        args, kwargs = make(i)
        try:
            result = producer.enqueue(task, args, kwargs, priority=priority,
                                      idempotency_key=f"feed-{uuid.uuid4()}")
            print(f"feed: {result.state} {task} -> {result.queue} ({priority})", flush=True)
        except TidegateError as exc:  # shed, throttled or broker down: say so, keep going
            print(f"feed: {task} refused: {exc}", flush=True)
        time.sleep(interval)
