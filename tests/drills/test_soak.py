"""Soak drill: the pipeline at ~80% of one worker's measured capacity, memory and keys flat.

A real ``celery -A workers worker -Q search`` (threads, 2) against the search simulator with
20 ms latency; the in-process :class:`~producers.Producer` paces ``search.index`` jobs (half of
them with an idempotency key) at 80% of the rate the worker was just measured to drain. Every
few seconds: the worker's RSS (process tree, /proc), the key count of the broker database and
of the state database, the backlog.

What it proves: nothing accumulates per job. The second half's memory and key counts stay
within a generous tolerance of the first half's; every per-job key in the state database
carries a TTL (the idempotency marks: the TTL is shortened here, so their steady state is
reached inside the run instead of after 7 days; the comparison starts after one TTL); keys
without a TTL are a fixed set (named per queue or dependency, never per job), no larger at the
end than at half time. Every accepted job is done.

Length: ``TIDEGATE_SOAK_S`` seconds, else 50 (CI) or 120 x ``TIDEGATE_DRILL_SCALE`` when the
scale is above 1 (`make drills`: 10 minutes).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL, Broker
from tests.support.procs import wait_until
from tests.support.soak import census, halves, tree_rss_bytes

pytestmark = [pytest.mark.integration, pytest.mark.drill]
SCALE = float(os.environ.get("TIDEGATE_DRILL_SCALE", "1"))
SOAK_S = float(os.environ.get("TIDEGATE_SOAK_S", 50 if SCALE <= 1 else 120 * SCALE))
SAMPLE_S = 2.0
IDEM_TTL_S = max(10, int(SOAK_S / 5))  # marks reach their steady state in the first half
WARM_UP_S = IDEM_TTL_S + 2 * SAMPLE_S  # compared: the samples after it, first vs second half
CALIBRATION_JOBS = 150
LOAD = 0.8
MiB = 1024 * 1024


class PacedProducer:
    """Enqueue ``search.index`` at ``rate``/s on a fixed schedule until stopped."""

    def __init__(self, producer, rate: float, prefix: str) -> None:
        self.producer, self.interval, self.prefix = producer, 1.0 / rate, prefix
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_at, i = time.monotonic(), 0
        while not self._stop.is_set():
            doc = f"{self.prefix}-{i}"
            try:
                self.producer.enqueue("search.index", [doc],
                                      idempotency_key=doc if i % 2 else None)
                self.accepted.append(doc)
            except Exception as exc:  # refused or failed: counted, never silently lost
                self.refused.append(f"{doc}: {type(exc).__name__}: {exc}")
            i += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> PacedProducer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _applied(sim, prefix: str) -> list[float]:
    """Sim-side times at which ``prefix`` jobs took effect, sorted."""
    effects = sim.ledger()["effects"].values()
    return sorted(e["applied_at"] for e in effects
                  if str(e["payload"].get("doc_id", "")).startswith(prefix))


def _measure_capacity(producer, sim) -> float:
    """Jobs/s one worker drains: a burst queued ahead, timed by the simulator's clock."""
    for i in range(CALIBRATION_JOBS):
        producer.enqueue("search.index", [f"cal-{i}"])
    times = wait_until(lambda: (t := _applied(sim, "cal-")) and len(t) >= CALIBRATION_JOBS
                       and t, 180, interval=0.5, message="calibration burst drained")
    return (len(times) - 1) / (times[-1] - times[0])


@pytest.mark.timeout(SOAK_S * 2 + 600)
def test_soak_memory_and_redis_keys_stay_flat(sims, policy_file, tmp_path: Path, request,
                                             redis_up, state_redis) -> None:
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
    broker_db = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    broker = Broker("redis", REDIS_BROKER_URL)
    sim = sims["search"]
    sim.control(latency_ms=20)
    worker = request.getfixturevalue("start_worker_on")(broker)(
        "search", concurrency=2, env={"TIDEGATE_IDEMPOTENCY_TTL_S": str(IDEM_TTL_S)})
    app = create_app(load_settings(broker_url=REDIS_BROKER_URL, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file))
    producer = Producer(app)
    try:
        capacity = _measure_capacity(producer, sim)
        rate = LOAD * capacity
        samples: list[tuple[float, int, int, int, int]] = []  # t, rss, broker, state, ready
        with PacedProducer(producer, rate, "soak") as load:
            started = time.monotonic()
            mid_census = None
            for _ in range(int(SOAK_S / SAMPLE_S) + 1):  # bounded: one sample per period
                t = time.monotonic() - started
                if t >= SOAK_S:
                    break
                assert worker.alive(), worker.output()[-3000:]
                samples.append((t, tree_rss_bytes(worker.pid), broker_db.dbsize(),
                                state_redis.dbsize(), broker_db.llen("search")))
                if mid_census is None and t >= SOAK_S / 2:
                    mid_census = census(state_redis)
                time.sleep(max(0.0, started + len(samples) * SAMPLE_S - time.monotonic()))
        end_census, broker_census = census(state_redis), census(broker_db)
        accepted = list(load.accepted)
        wait_until(lambda: len(_applied(sim, "soak-")) >= len(accepted), 120, interval=1.0,
                   message=f"all {len(accepted)} accepted soak jobs done")
    finally:
        app.close()

    ready = [s[4] for s in samples]
    steady = [s for s in samples if s[0] >= WARM_UP_S]  # marks accumulate up to their TTL first
    assert len(steady) >= 4, f"soak too short for a {WARM_UP_S:.0f} s warm-up"
    rss = [s[1] / MiB for s in steady]
    rss_1, rss_2 = halves(rss)
    kb_1, kb_2 = halves([float(s[2]) for s in steady])
    ks_1, ks_2 = halves([float(s[3]) for s in steady])
    print(f"\nsoak: {SOAK_S:.0f} s at {rate:.1f}/s (capacity {capacity:.1f}/s), "
          f"{len(accepted)} accepted, {len(load.refused)} refused, max ready {max(ready)}")
    print(f"  after a {WARM_UP_S:.0f} s warm-up, {len(steady)} samples:")
    print(f"  worker RSS MiB   first half {rss_1:.1f}  second half {rss_2:.1f}  "
          f"(min {min(rss):.1f}, max {max(rss):.1f})")
    print(f"  broker db keys   first half {kb_1:.1f}  second half {kb_2:.1f}")
    print(f"  state db keys    first half {ks_1:.1f}  second half {ks_2:.1f}  "
          f"(idempotency TTL {IDEM_TTL_S} s)")
    print(f"  state db families at the end:\n{end_census.describe()}")
    print(f"  broker db families at the end:\n{broker_census.describe()}")

    assert not load.refused, load.refused[:5]
    assert max(ready) < rate * 10, "at 80% load the queue must not build up"
    assert rss_2 <= rss_1 * 1.2 + 16, (rss_1, rss_2)
    assert kb_2 <= kb_1 * 1.5 + 10, (kb_1, kb_2)
    assert ks_2 <= ks_1 * 1.5 + 50, (ks_1, ks_2)
    # Per-job keys expire: a key without a TTL is one of a fixed set, already there at half time.
    assert mid_census is not None
    assert sum(end_census.without_ttl.values()) <= sum(mid_census.without_ttl.values()) + 2, (
        end_census.describe(), mid_census.describe())
    per_job = [f for f in end_census.without_ttl if "*" in f]  # a name with an id in it
    assert not per_job, f"keys per job without a TTL: {per_job}"
    assert not broker_census.with_ttl or max(broker_census.max_ttl_s.values()) < 86_400 * 8
    assert all(n < 50 for n in end_census.without_ttl.values()), end_census.describe()
