"""A gentle, steady stream of mixed jobs so a freshly started pipeline has work to show."""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections import Counter

from producers import Producer
from resilience.errors import TidegateError
from workers.installation import DEFAULT_APP, load_app

JOBS = (
    ("payments.charge", "critical", lambda i: ([f"acct-{i % 50}", 500 + i % 900], {})),
    ("search.index", "high", lambda i: ([f"doc-{i}"], {"body": {"title": f"document {i}"}})),
    ("email.send", "medium", lambda i: ([f"user{i % 200}@example.test", f"receipt {i}"], {})),
)


def run(rate: float, count: int | None = None, *, summary_s: float = 60.0) -> None:
    """Enqueue ``rate`` jobs per second (``count`` in all, or until interrupted).

    Prints a line when the outcome changes (queued -> refused and back) and a summary every
    ``summary_s``, not a line per job: at 2 jobs/s that alone was 120 lines a minute.
    """
    producer = Producer(load_app(DEFAULT_APP))  # the example's tasks, whatever TIDEGATE_APP says
    rng = random.Random()
    interval = 1.0 / rate
    counts: Counter[str] = Counter()
    last_kind, since = None, time.monotonic()
    for i in itertools.count() if count is None else range(count):
        task, priority, make = rng.choice(JOBS)
        args, kwargs = make(i)
        try:
            result = producer.enqueue(task, args, kwargs, priority=priority,
                                      idempotency_key=f"feed-{uuid.uuid4()}")
            kind, detail = result.state, ""
        except TidegateError as exc:  # shed, throttled or broker down: say so, keep going
            kind, detail = f"refused ({type(exc).__name__})", f": {task}: {exc}"
        counts[kind] += 1
        if kind != last_kind:
            print(f"feed: now {kind}{detail}", flush=True)
            last_kind = kind
        if time.monotonic() - since >= summary_s:
            print(f"feed: last {summary_s:.0f} s: " + ", ".join(
                f"{n} {k}" for k, n in counts.most_common()), flush=True)
            counts.clear()
            since = time.monotonic()
        time.sleep(interval)
