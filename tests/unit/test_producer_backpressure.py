"""The depth throttle's logic on a fake depth source and a fake clock (no broker needed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from producers.backpressure import BackpressureConfig, Throttle, load_backpressure
from resilience.errors import Backpressure, ConfigError
from resilience.shedding import Priority
from workers.depth import DepthEstimate, DepthUnavailable, QueueDepth
from workers.topology import load_topology

CFG = BackpressureConfig(low_watermark=100, high_watermark=200, max_wait_s=1.0, poll_s=0.05)


class FakeCache:
    """Stands in for SharedDepthCache: a settable depth and drain rate."""

    def __init__(self, depth: int = 0, drain: float | None = 10.0) -> None:
        self.depth = depth
        self.drain = drain
        self.fail = False
        self.reads = 0
        self.published = 0

    def estimate(self, queue: str) -> DepthEstimate:
        self.reads += 1
        if self.fail:
            raise DepthUnavailable("broker down")
        return DepthEstimate(QueueDepth(queue, self.depth, 0, None, None, None, "fake", 0.0),
                             0, self.drain)

    def record_published(self, queue: str, count: int = 1) -> None:
        self.published += count


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def throttle(cache: FakeCache, rng=lambda: 0.5, cfg: BackpressureConfig = CFG):
    t = FakeTime()
    return Throttle(cache, cfg, rng=rng, clock=t.clock, sleep=t.sleep), t


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        # depth: LOW, MEDIUM, HIGH admission probability (CRITICAL is always 1)
        (0, (1.0, 1.0, 1.0)),
        (100, (1.0, 1.0, 1.0)),  # at the low watermark: full speed
        (125, (0.5, 1.0, 1.0)),  # LOW's band is [low, low + span/2]
        (150, (0.0, 0.5, 1.0)),
        (175, (0.0, 0.0, 0.5)),
        (200, (0.0, 0.0, 0.0)),  # at the high watermark only CRITICAL goes
        (10_000, (0.0, 0.0, 0.0)),
    ],
)
def test_admission_falls_smoothly_and_by_class(depth, expected):
    cache = FakeCache(depth)
    th, _ = throttle(cache)
    shedder = th._shedder
    got = tuple(shedder.admission_probability(p, CFG.load(depth))
                for p in (Priority.LOW, Priority.MEDIUM, Priority.HIGH))
    assert got == pytest.approx(expected)
    assert th.decide("q", Priority.CRITICAL).admitted


def test_shedding_order_is_low_then_medium_then_high_and_never_critical():
    for depth in range(0, 400, 5):
        th, _ = throttle(FakeCache(depth), rng=lambda: 0.999)
        admitted = {p: th.decide("q", p).admitted for p in Priority}
        assert admitted[Priority.CRITICAL]
        # a class is only refused once every less important class is refused too
        if not admitted[Priority.HIGH]:
            assert not admitted[Priority.MEDIUM]
        if not admitted[Priority.MEDIUM]:
            assert not admitted[Priority.LOW]


def test_refusal_after_bounded_wait_with_retry_after_from_drain_rate():
    cache = FakeCache(depth=300, drain=20.0)
    th, t = throttle(cache)
    with pytest.raises(Backpressure) as info:
        th.admit("q", Priority.LOW, max_wait_s=0.5)
    # LOW is admitted half the time at low + span/4 = 125: (300 - 125) / 20 per s = 8.75 s
    assert info.value.retry_after == pytest.approx(8.75)
    assert info.value.priority is Priority.LOW
    assert t.now <= 0.5 + 1e-9  # waited no longer than allowed
    # HIGH needs less draining: (300 - 175) / 20 = 6.25 s
    with pytest.raises(Backpressure) as info:
        th.admit("q", Priority.HIGH, max_wait_s=0)
    assert info.value.retry_after == pytest.approx(6.25)


def test_retry_after_when_nothing_drains_is_the_configured_maximum():
    th, _ = throttle(FakeCache(depth=300, drain=0.0))
    with pytest.raises(Backpressure) as info:
        th.admit("q", Priority.MEDIUM, max_wait_s=0)
    assert info.value.retry_after == CFG.max_retry_after_s


def test_a_waiting_call_is_admitted_once_the_queue_drains():
    cache = FakeCache(depth=250, drain=100.0)
    t = FakeTime()

    def sleep(seconds: float) -> None:
        t.sleep(seconds)
        cache.depth = max(0, cache.depth - int(100 * seconds))  # the worker drains

    th = Throttle(cache, CFG, rng=lambda: 0.5, clock=t.clock, sleep=sleep)
    d = th.admit("q", Priority.HIGH, max_wait_s=2.0)
    assert d.admitted and d.depth <= 175
    assert 0 < t.now < 2.0


def test_only_calls_held_back_are_recorded_as_throttle_waits():
    from prometheus_client import REGISTRY

    def waits() -> float:
        return REGISTRY.get_sample_value("tidegate_producer_throttle_wait_seconds_count",
                                         {"queue": "held"}) or 0.0

    before = waits()
    cache = FakeCache(depth=0, drain=100.0)
    th, t = throttle(cache)

    def ticking() -> float:  # a real clock moves between two reads: "waited > 0" always held
        t.now += 1e-6
        return t.now

    th.clock = ticking
    for _ in range(3):
        assert th.admit("held", Priority.HIGH).admitted
    assert waits() == before  # admitted at once: not throttled
    cache.depth = 250
    original = t.sleep

    def sleep(seconds: float) -> None:
        original(seconds)
        cache.depth = 0

    th.sleep = sleep
    assert th.admit("held", Priority.HIGH, max_wait_s=2.0).admitted
    assert waits() == before + 1


def test_hopeless_waits_are_cut_short():
    """retry_after far beyond the wait budget: refuse at once instead of holding the caller."""
    cache = FakeCache(depth=10_000, drain=1.0)
    th, t = throttle(cache)
    with pytest.raises(Backpressure):
        th.admit("q", Priority.LOW, max_wait_s=1.0)
    assert t.now == 0 and cache.reads == 1


def test_depth_unavailable_fails_open_and_stops_probing_for_a_while():
    cache = FakeCache()
    cache.fail = True
    th, t = throttle(cache)
    for _ in range(5):
        assert th.decide("q", Priority.LOW).admitted
    assert cache.reads == 1
    t.now += 2
    th.decide("q", Priority.LOW)
    assert cache.reads == 2


def test_async_admit_waits_without_blocking_the_loop():
    cache = FakeCache(depth=300, drain=1000.0)
    th = Throttle(cache, CFG)

    async def main() -> float:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(Backpressure):
            await th.admit_async("q", Priority.LOW, max_wait_s=0.3)
        task.cancel()
        assert ticks >= 5  # the loop kept running while we waited
        return time.monotonic() - started

    assert asyncio.run(main()) < 5


def test_config_validation():
    with pytest.raises(ConfigError, match="must exceed"):
        BackpressureConfig(low_watermark=10, high_watermark=10)
    with pytest.raises(ConfigError, match="integer"):
        BackpressureConfig(low_watermark=-1)
    with pytest.raises(ConfigError, match="poll_s"):
        BackpressureConfig(poll_s=0)


def _policy(tmp_path: Path, extra: str) -> Path:
    shipped = (Path(__file__).resolve().parents[2] / "workers" / "policy.toml").read_text()
    path = tmp_path / "policy.toml"
    path.write_text(shipped + "\n" + extra)
    return path


def test_policy_file_tables(tmp_path):
    path = _policy(tmp_path, """
[backpressure]
low_watermark = 50
high_watermark = 80
max_wait_ms = 250
[backpressure.search]
high_watermark = 500
""")
    default, per_queue = load_backpressure(path, load_topology(path))
    assert (default.low_watermark, default.high_watermark, default.max_wait_s) == (50, 80, 0.25)
    assert per_queue["search"].low_watermark == 50  # inherited
    assert per_queue["search"].high_watermark == 500


@pytest.mark.parametrize(("extra", "message"), [
    ("[backpressure]\nlow_water = 5\n",
     r"\[backpressure.low_water\]: unknown key; did you mean 'low_watermark'"),
    ("[backpressure.nope]\nlow_watermark = 5\n", r"\[backpressure.nope\]: unknown queue"),
    ("[backpressure.search]\nlow_watermark = 900\nhigh_watermark = 100\n", "must exceed"),
    ("[backpressure]\nmax_wait_ms = 'soon'\n",
     r"\[backpressure.max_wait_ms\]: input should be a valid number"),
])
def test_policy_file_errors_name_the_table(tmp_path, extra, message):
    path = _policy(tmp_path, extra)
    with pytest.raises(ConfigError, match=message):
        load_backpressure(path, load_topology(path))
