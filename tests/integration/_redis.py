"""Helpers for the shared-state tests: a dedicated Redis db, and process entry points
(importable, so multiprocessing's spawn start method can run them)."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import time
import uuid

REDIS_URL = os.environ.get(
    "TIDEGATE_STATE_TEST_URL",
    f"redis://127.0.0.1:{os.environ.get('TIDEGATE_TEST_REDIS_PORT', '6379')}/9")


def client():
    from resilience.stores import redis_client

    return redis_client(REDIS_URL, socket_timeout=2.0, socket_connect_timeout=2.0)


def new_prefix() -> str:
    return f"tgtest-{uuid.uuid4().hex[:8]}"


def store(prefix: str):
    from resilience.stores import RedisStore

    return RedisStore(client(), prefix=prefix)


def breaker(prefix: str, name: str, **cfg):
    from resilience.breaker import BreakerConfig, CircuitBreaker

    return CircuitBreaker(name, BreakerConfig(**cfg), store(prefix))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ----------------------------------------------------------------- process entry points


def watch_until_open(prefix, name, cfg, ready, out, timeout=20.0):
    """Ask for permits (recording nothing, so as not to dilute the failure rate) until the
    shared breaker rejects; report how it ended."""
    from resilience.errors import CircuitOpen

    b = breaker(prefix, name, **cfg)
    ready.set()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            b.acquire()
        except CircuitOpen:
            out.put(("open", os.getpid()))
            return
        time.sleep(0.01)
    out.put(("timeout", os.getpid()))


def fail_until_open(prefix, name, cfg, out, timeout=20.0):
    from resilience.errors import CircuitOpen, TransientError

    b = breaker(prefix, name, **cfg)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            b.record(b.acquire(), TransientError("down"), 0.001)
        except CircuitOpen:
            out.put(("open", os.getpid()))
            return
        time.sleep(0.005)
    out.put(("timeout", os.getpid()))


def grab_trials(prefix, name, cfg, stop, out):
    """Try to get permits until told to stop; report every permit granted, hold it."""
    from resilience.errors import CircuitOpen

    b = breaker(prefix, name, **cfg)
    held = []
    while not stop.is_set():
        try:
            permit = b.acquire()
        except CircuitOpen:
            time.sleep(0.005)
            continue
        held.append(permit)
        out.put(("probe" if permit.probe else "normal", os.getpid()))
    for permit in held:
        b.record(permit, None, 0.001)
    out.put(("done", os.getpid()))


def hammer_limiter(prefix, name, rate, burst, ready, go, start_at, seconds, out):
    """Say ready, wait for ``go``, then take tokens from ``start_at.value`` for ``seconds``
    (the parent sets the start only once every process is up, however slow the spawn).
    Puts ``(granted, times)``: ``times`` are when each attempt was sent, so the parent sees
    where no process asked at all (a starved machine), see :func:`check_global_limit`."""
    from resilience.ratelimit import RateLimitConfig, RateLimiter

    rl = RateLimiter(name, RateLimitConfig(rate=rate, burst=burst), store(prefix))
    rl.try_acquire("warm-up")  # connect and load the script before the window opens
    ready.set()
    if not go.wait(120):
        out.put((-1, []))
        return
    start_at = start_at.value
    while time.time() < start_at:
        time.sleep(0.001)
    allowed, times = 0, []
    while (now := time.time()) < start_at + seconds:
        times.append(now)
        ok, _ = rl.try_acquire("global")
        allowed += ok
        time.sleep(0.001)
    out.put((allowed, times))


def check_global_limit(results, rate, burst, start, seconds):
    """The processes together got what one limiter allows: never more than ``rate * seconds
    + burst`` (10% slack), and at ``rate`` while any of them was asking (10% slack).

    The lower bound counts only the time some process asked: the bucket banks ``burst``
    tokens, so a pause in the asking longer than that (a loaded machine running none of the
    processes) loses tokens, which lowers what could be granted, not what the limiter proves.
    Use a burst of several tokens: with 1, every attempt arriving after a token fell due
    shifts the schedule by the delay, and a slow machine measures its own round trips.
    """
    counts = [granted for granted, _ in results]
    times = sorted(t for _, ts in results for t in ts)
    edges = [start, *times, start + seconds]
    idle = sum(max(0.0, b - a - burst / rate) for a, b in itertools.pairwise(edges))
    asked = seconds - idle
    ceiling = rate * seconds + burst
    floor = rate * asked
    total = sum(counts)
    detail = (f"counts {counts} = {total}; ceiling {ceiling:.0f}; asked {asked:.2f}s of "
              f"{seconds}s (no process ran for {idle:.2f}s): floor {floor:.0f}")
    assert all(c > 0 for c in counts), detail  # every process got a share
    assert asked >= seconds / 2, f"too few attempts to measure anything: {detail}"
    assert total <= 1.1 * ceiling, detail
    assert total >= 0.9 * floor, detail
    return detail


# Drivers, run in the test's own process: the scenarios the single-node and the cluster
# tests share (each spawns processes running the entry points above).

def collect(out, n, timeout):
    """Up to ``n`` reports from the processes' queue, waiting at most ``timeout`` s."""
    got = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        with contextlib.suppress(queue.Empty):
            got.append(out.get(timeout=0.2))
    return got


def open_in_one_process(ctx, prefix, name, cfg, watchers, ready_s, collect_s):
    """``watchers`` processes watch breaker ``name``; once all are up, one more fails calls
    until it opens. What every process reported (``("open", ...)`` from each when shared)."""
    out, readies = ctx.Queue(), [ctx.Event() for _ in range(watchers)]
    procs = [ctx.Process(target=watch_until_open, args=(prefix, name, cfg, r, out))
             for r in readies]
    for p in procs:
        p.start()
    assert all(r.wait(ready_s) for r in readies)
    failer = ctx.Process(target=fail_until_open, args=(prefix, name, cfg, out))
    failer.start()
    got = collect(out, watchers + 1, collect_s)
    for p in [*procs, failer]:
        p.join(10)
    return got


def hammer_together(ctx, prefix, name, rate, burst, seconds, processes, ready_s, collect_s):
    """``processes`` processes hammer one limiter for ``seconds`` from the same instant (set
    once every spawned interpreter is up: a late one would shrink the measured total).
    Returns their reports and that start time, for :func:`check_global_limit`."""
    out, go = ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    readies = [ctx.Event() for _ in range(processes)]
    procs = [ctx.Process(target=hammer_limiter,
                         args=(prefix, name, rate, burst, r, go, start_at, seconds, out))
             for r in readies]
    for p in procs:
        p.start()
    assert all(r.wait(ready_s) for r in readies)
    start_at.value = time.time() + 0.5
    go.set()
    results = collect(out, processes, collect_s)
    for p in procs:
        p.join(10)
    return results, start_at.value
