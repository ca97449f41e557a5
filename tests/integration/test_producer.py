"""The Producer against real brokers: flood control, shedding order, rate limit, failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from resilience.errors import Backpressure, RateLimited
from resilience.ratelimit import RateLimitConfig
from resilience.shedding import Priority
from tests.conftest import STATE_REDIS_URL, tidegate_env
from tests.support.procs import Worker, wait_until
from workers.errors import BrokerUnavailable, InvalidPayload, UnknownTask
from workers.installation import installation

pytestmark = pytest.mark.integration

LOW, HIGH = 20, 40  # watermarks of the search queue in these tests


@pytest.fixture
def bp_policy(policy_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "policy-bp.toml"
    path.write_text(policy_file.read_text() + f"""
[backpressure.search]
low_watermark = {LOW}
high_watermark = {HIGH}
max_wait_ms = 200
""")
    return path


@pytest.fixture
def bp_app(broker, bp_policy):
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=bp_policy))
    yield app
    app.close()


def _producer(app, **kw):
    from producers import Producer

    return Producer(app, **kw)


def test_flood_keeps_depth_under_high_watermark_and_the_worker_busy(
        broker, bp_app, bp_policy, sims, state_redis, tmp_path):
    """4 threads push as fast as they can against one slow worker for ~5 s."""
    from workers.depth import probe_for

    sims["search"].control(mode="slow", latency_ms=40)
    worker = Worker("search", tidegate_env(broker, bp_policy), tmp_path, concurrency=1)
    worker.wait_ready()
    producer = _producer(bp_app)
    truth = probe_for(installation(bp_app).settings)
    stop = threading.Event()
    counts = {"ok": 0, "refused": 0}
    lock = threading.Lock()

    def flood(i: int) -> None:
        prio = [Priority.LOW, Priority.MEDIUM, Priority.HIGH, Priority.HIGH][i]
        n = 0
        while not stop.is_set():
            n += 1
            try:
                producer.enqueue("search.index", [f"f{i}-{n}"], priority=prio, max_wait_s=0.2)
                key = "ok"
            except Backpressure:
                key = "refused"
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    samples: list[int] = []
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            samples.append(truth.depth("search").ready)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    applied_during = sims["search"].ledger()["applied"]
    worker.stop()

    assert counts["refused"] > counts["ok"] / 2, counts  # it really was a flood
    assert max(samples) <= HIGH * 1.1 + 2, (max(samples), samples)
    # The worker never ran dry after the first second: the throttle kept work queued.
    settled = samples[len(samples) // 5:]
    assert sum(1 for s in settled if s > 0) >= 0.9 * len(settled), settled
    assert applied_during > 10


def test_shedding_order_by_priority_and_critical_never_refused(broker, bp_app, state_redis):
    """No worker: fill the queue and watch each class stop in turn."""
    from workers.depth import probe_for

    producer = _producer(bp_app)
    truth = probe_for(installation(bp_app).settings)
    admitted_at: dict[Priority, list[int]] = {p: [] for p in Priority}  # depth when asked
    refused_at: dict[Priority, int] = {}
    for _ in range(HIGH + 10):
        for p in (Priority.LOW, Priority.MEDIUM, Priority.HIGH):
            if p in refused_at:
                continue
            depth = truth.depth("search").ready
            try:
                producer.enqueue("search.index", ["d"], priority=p, max_wait_s=0)
                admitted_at[p].append(depth)
            except Backpressure as exc:
                refused_at[p] = depth
                assert exc.retry_after and exc.retry_after > 0
    assert set(refused_at) == {Priority.LOW, Priority.MEDIUM, Priority.HIGH}
    # Each class is refused only inside its own band of the span (producers/backpressure.py):
    # admitted for sure up to where its ramp starts, never from where it reaches 0. Between
    # those the draw is random and neighbouring bands overlap (LOW at 27 has p = 0.3, MEDIUM
    # p = 0.8), so MEDIUM may stop before LOW in one run; LOW stops no later than HIGH.
    span = HIGH - LOW
    bands = {Priority.LOW: (LOW, LOW + span // 2),
             Priority.MEDIUM: (LOW + span // 4, LOW + 3 * span // 4),
             Priority.HIGH: (LOW + span // 2, HIGH)}
    for p, (certain, never) in bands.items():
        assert certain < refused_at[p], (p, refused_at, admitted_at)
        assert max(admitted_at[p]) < never, (p, refused_at, admitted_at)
    assert refused_at[Priority.LOW] <= refused_at[Priority.HIGH], refused_at
    depth = truth.depth("search").ready
    for _ in range(5):  # CRITICAL above the high watermark: still published
        producer.enqueue("search.index", ["c"], priority=Priority.CRITICAL, max_wait_s=0)
    assert truth.depth("search").ready == depth + 5


def test_client_rate_limit_is_global_through_redis(broker, bp_app, state_redis):
    from producers.producer import client_limiter

    config = RateLimitConfig(rate=2, burst=3)
    # two producers, as if in two processes: they share one budget per client
    a = _producer(bp_app, limiter=client_limiter(installation(bp_app).settings, config))
    b = _producer(bp_app, limiter=client_limiter(installation(bp_app).settings, config))
    outcomes = []
    for i in range(6):
        try:
            (a if i % 2 else b).enqueue("email.send", ["x@example.com", "s", "b"],
                                        client="tenant-1")
            outcomes.append("ok")
        except RateLimited as exc:
            outcomes.append("limited")
            assert 0 < exc.retry_after <= 1.0  # 2/s: the next token is at most 0.5 s away
    assert outcomes[:3] == ["ok"] * 3 and outcomes.count("limited") >= 2
    a.enqueue("email.send", ["x@example.com", "s", "b"], client="tenant-2")  # separate budget
    a.enqueue("email.send", ["x@example.com", "s", "b"])  # no client: not limited


def test_bad_input_is_refused_before_any_publish(broker, bp_app, state_redis):
    from workers.depth import probe_for

    producer = _producer(bp_app)
    with pytest.raises(UnknownTask, match="known: "):
        producer.enqueue("search.nope")
    with pytest.raises(InvalidPayload, match="JSON-serialisable"):
        producer.enqueue("search.index", [float("nan")])
    with pytest.raises(InvalidPayload, match="idempotency_key"):
        producer.enqueue("search.index", ["d"], idempotency_key="")
    assert probe_for(installation(bp_app).settings).depth("search").ready == 0


def test_batch_enqueue_reports_each_job(broker, bp_app, state_redis):
    from producers import Job
    from workers.depth import probe_for

    producer = _producer(bp_app)
    jobs = [Job("search.index", [f"b{i}"]) for i in range(5)]
    jobs.insert(2, Job("nope.task"))
    results = producer.enqueue_many(jobs)
    assert [type(r).__name__ for r in results] == (["EnqueueResult"] * 2 + ["UnknownTask"]
                                                   + ["EnqueueResult"] * 3)
    assert len({r.id for r in results if hasattr(r, "id")}) == 5
    assert probe_for(installation(bp_app).settings).depth("search").ready == 5


def test_async_producer_publishes(broker, bp_app, state_redis):
    import asyncio

    from producers import AsyncProducer
    from workers.depth import probe_for

    ap = AsyncProducer(_producer(bp_app))

    async def main():
        return await asyncio.gather(*(ap.enqueue("search.index", [f"a{i}"]) for i in range(4)))

    results = asyncio.run(main())
    assert {r.state for r in results} == {"queued"}
    assert probe_for(installation(bp_app).settings).depth("search").ready == 4


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"])
def test_unreachable_broker_is_a_clear_error_within_the_connect_timeout(url, policy_file,
                                                                       redis_up):
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file, connect_timeout_s=1.0))
    producer = _producer(app)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1") as info:
        producer.enqueue("search.index", ["d"])
    assert time.monotonic() - started < 8  # connect timeout 1 s (+ the depth probe's), no hang
    assert "guest@" not in str(info.value)  # no password in the message
    app.close()


def test_amqp_queue_deleted_behind_kombus_back_is_redeclared_not_lost(rabbitmq_up, policy_file,
                                                                     state_redis):
    from kombu import Connection

    from workers.application import create_app
    from workers.depth import probe_for
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=rabbitmq_up, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file))
    producer = _producer(app)
    producer.enqueue("email.send", ["x@example.com", "s", "b"])  # kombu now caches "declared"
    with Connection(rabbitmq_up, connect_timeout=5) as conn:
        conn.default_channel.queue_delete("email")
    producer.enqueue("email.send", ["y@example.com", "s", "b"])
    wait_until(lambda: probe_for(installation(app).settings).depth("email").ready == 1, 10,
               message="the second message in the re-declared queue")
    app.close()


def test_open_circuit_defers_queue_for_later_jobs_instead_of_queueing(broker, bp_app,
                                                                     state_redis):
    """A worker trips email's shared breaker; the producer stores new email jobs for later."""
    from producers.deferral import DeferralGate
    from resilience.breaker import CircuitBreaker
    from resilience.fallback import MemoryDeferralSink
    from resilience.policy import PolicyConfig
    from resilience.stores import RedisStore, redis_client
    from workers.depth import probe_for

    topology = installation(bp_app).topology
    sink = MemoryDeferralSink()
    auto = DeferralGate.from_settings(installation(bp_app).settings, topology,
                                      redis_client(STATE_REDIS_URL, socket_timeout=1,
                                                   socket_connect_timeout=1))
    assert auto is not None and set(auto.breakers) == {"email"}  # only fallback kind "queue"
    gate = DeferralGate(topology, auto.breakers, lambda dep: sink)
    producer = _producer(bp_app, deferral=gate)
    truth = probe_for(installation(bp_app).settings)

    assert producer.enqueue("email.send", ["a@example.com", "s", "b"]).state == "queued"
    config = PolicyConfig.from_mapping("email", topology.dependency("email").policy)
    worker_side = CircuitBreaker("email", config.breaker,
                                 RedisStore(redis_client(STATE_REDIS_URL, socket_timeout=1,
                                                         socket_connect_timeout=1)))
    worker_side.force_open(60)

    queued_meanwhile = []

    def deferred():  # the producer's view of the shared breaker lags by its sync interval
        result = producer.enqueue("email.send", ["b@example.com", "s", "b"],
                                  idempotency_key="mail-2")
        if result.state == "queued":
            queued_meanwhile.append(result)
        return result.state == "deferred"

    wait_until(deferred, 10, message="producer sees the open circuit")
    (stored,) = [r for r in sink.requests.values() if r.idempotency_key == "mail-2"]
    assert stored.task == "email.send" and stored.reason == "circuit_open"
    # the deferred job is not in the queue; the ones published before the producer noticed are
    assert truth.depth("email").ready == 1 + len(queued_meanwhile)
    # other dependencies are unaffected
    assert producer.enqueue("search.index", ["d"]).state == "queued"
