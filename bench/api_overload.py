"""API overload: the real HTTP API at ~3x what it can publish, beside a 503-at-once floor.

A private ``redis-server`` (state, and broker by default; ``--broker amqp``: the local RabbitMQ
with publisher confirms, in a vhost of the run's own) and the API under uvicorn in a subprocess, as
``tidegate api`` serves it, plus one route the benchmark adds, ``POST /bench/floor``, which
answers 503 at once: the cost of HTTP, routing and middleware alone on this machine.

1. capacity R: closed loop, 32 connections, CRITICAL jobs only (never shed), 4 s (202/s);
2. overload: open loop at 3R over 128 connections, priorities 10% CRITICAL, 30% HIGH,
   30% MEDIUM, 30% LOW; one client in five is a "greedy" token far over its rate (429s);
3. floor: the same schedule against ``/bench/floor``.

The load comes from ``wrk`` where it is installed (bench/api_overload.lua: one connection per
wrk thread, open loop, each answer timed and filed by status and priority), else from an
asyncio client in this process (``--client python``), which costs the shared cores far more.
Each phase prints the API process's share of a core and its CPU time per answer, and how far
behind schedule the client sent (a slow server holds its connections).

It also prints the least CPU the offered load needs of the API process: 10% of it accepted at
phase 1's CPU per accepted job, 90% refused at the floor's CPU per answer. Where that is near one
core, a Python process (one GIL) cannot answer in milliseconds whatever it decides.

Prints p50/p99/max latency and throughput per status code, the floor's, the ratios and the
targets (429/503 p99 <= 50 ms and <= 3x the floor; 202 p99 <= TIDEGATE_API_MAX_WAIT_MS +
50 ms; no answer slower than 1 s; CRITICAL 100% accepted). Loopback only, bounded in time.

    .venv/bin/python bench/api_overload.py            # ~40 s
    .venv/bin/python bench/api_overload.py --seconds 20 --factor 3
    .venv/bin/python bench/api_overload.py --broker amqp
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tidegate.stack import Proc, ensure_vhost, free_port, wait_until  # noqa: E402

MAX_WAIT_MS = 250
TOKENS = [f"bench-token-{i}" for i in range(40)]
GREEDY = "bench-greedy"
CLIENT_RATE = 100  # per token per second: the 40 fair tokens stay under it, GREEDY does not
MIX = (["critical"] * 1 + ["high"] * 3 + ["medium"] * 3 + ["low"] * 3)
SLOW_S = 1.0


def bench_app():
    """The API as ``tidegate api`` builds it, plus the floor route (uvicorn --factory)."""
    from fastapi.responses import JSONResponse

    from producers.api import create_api

    app = create_api()

    @app.post("/bench/floor", include_in_schema=False)
    async def floor() -> JSONResponse:
        return JSONResponse({"error": "floor", "message": "refused at once"}, status_code=503,
                            headers={"Retry-After": "1"})

    return app


class Server:
    """redis-server and the API, on free loopback ports, stopped for sure."""

    def __init__(self, tmp: Path, workers: int = 1, broker: str = "redis") -> None:
        self.redis_port, self.port = free_port(), free_port()
        self.vhost = f"tidegate_apibench_{os.getpid()}" if broker == "amqp" else ""
        self.redis = Proc(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no"], {}, tmp / "redis.log", "redis")
        policy = tmp / "policy.toml"
        policy.write_text((ROOT / "workers" / "policy.toml").read_text()
                          + "\n[backpressure]\nlow_watermark = 10000000\n"
                            "high_watermark = 20000000\n")
        broker_url = f"redis://127.0.0.1:{self.redis_port}/0"
        if self.vhost:  # the shared RabbitMQ, a vhost of this run's own (deleted at stop)
            ensure_vhost(self.vhost)
            broker_url = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"
        env = {"TIDEGATE_BROKER_URL": broker_url,
               "TIDEGATE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/1",
               "TIDEGATE_POLICY_FILE": str(policy),
               "TIDEGATE_API_TOKENS": ",".join([*TOKENS, GREEDY]),
               "TIDEGATE_API_CLIENT_RATE_PER_S": str(CLIENT_RATE),
               "TIDEGATE_API_CLIENT_BURST": str(CLIENT_RATE),
               "TIDEGATE_API_MAX_WAIT_MS": str(MAX_WAIT_MS),
               "PYTHONPATH": str(ROOT),
               # the lane's knobs may be tried from the shell (TIDEGATE_API_PUBLISH_THREADS=1)
               **{k: v for k, v in os.environ.items()
                  if k in ("TIDEGATE_API_PUBLISH_THREADS", "TIDEGATE_API_PUBLISH_BATCH",
                           "TIDEGATE_API_MAX_QUEUED", "TIDEGATE_API_GIL_SWITCH_MS")}}
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = Proc([sys.executable, "-m", "uvicorn", "bench.api_overload:bench_app",
                         "--factory", "--port", str(self.port), "--host", "127.0.0.1",
                         "--no-access-log", "--log-level", "warning",
                         *(["--workers", str(workers)] if workers > 1 else [])],
                        env, tmp / "api.log",
                        "api")
        wait_until(lambda: not self.api.alive() or httpx.get(f"{self.url}/healthz", timeout=2)
                   .status_code == 200, 60, interval=0.2, message="api up")
        if not self.api.alive():
            raise SystemExit(f"api did not start:\n{self.api.output()[-3000:]}")

    def stop(self) -> None:
        self.api.stop()
        self.redis.stop()
        if self.vhost:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.vhost], timeout=120,
                           capture_output=True)


def request_bytes(path: str, token: str, priority: str, n: int) -> bytes:
    body = json.dumps({"task": "search.index", "args": [f"doc-{n}"],
                       "priority": priority}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   raw: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a kept-alive connection; the status code and body."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length) if length else b""


class Load:
    """Open or closed loop over ``connections`` kept-alive connections."""

    def __init__(self, port: int, path: str, connections: int) -> None:
        self.port, self.path, self.connections = port, path, connections
        self.results: list[tuple[str, int, float]] = []  # (priority, status, seconds)
        self.reasons: dict[tuple[int, str], list[float]] = defaultdict(list)
        self.late = 0  # requests sent later than scheduled (the client fell behind)
        self.cpu_note = ""
        self.cpu_s = 0.0  # the API process's CPU seconds in the phase (drive)

    def pick(self, n: int) -> tuple[str, str]:
        priority = MIX[n % len(MIX)]
        token = GREEDY if n % 5 == 1 else TOKENS[(n // 5) % len(TOKENS)]
        return token, priority

    async def run(self, seconds: float, rate: float | None) -> float:
        """Send for ``seconds`` (open loop at ``rate``/s, else closed); wall time taken."""
        counter = itertools.count()
        start = time.monotonic()
        end = start + seconds

        async def connection() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                while True:
                    n = next(counter)
                    due = start + n / rate if rate else time.monotonic()
                    if due >= end:
                        return
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif delay < -0.01:
                        self.late += 1
                    token, priority = self.pick(n) if rate else (TOKENS[n % len(TOKENS)],
                                                                  "critical")
                    sent = time.monotonic()
                    try:
                        status, body = await asyncio.wait_for(exchange(
                            reader, writer, request_bytes(self.path, token, priority, n)), 10)
                        why = (json.loads(body).get("error", "?") if body else "?"
                               ) if status != 202 else "accepted"
                        self.reasons[(status, f"{why} {priority}")].append(
                            time.monotonic() - sent)
                    except (TimeoutError, OSError, asyncio.IncompleteReadError):
                        status = 0
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    self.results.append((priority, status, time.monotonic() - sent))
            finally:
                writer.close()

        await asyncio.gather(*(connection() for _ in range(self.connections)))
        return time.monotonic() - start


class WrkLoad:
    """The same schedule driven by ``wrk`` (C, epoll) with bench/api_overload.lua: a client
    that costs the 2-core machine a fraction of what the asyncio one does, so the server gets
    the CPU and the figures measure the server. One connection per wrk thread (the script times
    each answer and files it by status code and priority)."""

    def __init__(self, port: int, path: str, connections: int) -> None:
        self.port, self.path, self.connections = port, path, connections
        self.results: list[tuple[str, int, float]] = []
        self.reasons: dict[tuple[int, str], list[float]] = defaultdict(list)
        self.late = 0
        self.late_ms: list[float] = []
        self.cpu_note = ""
        self.cpu_s = 0.0  # the API process's CPU seconds in the phase (drive)
        self.client_cpu_s = 0.0

    def run(self, seconds: float, rate: float | None) -> float:
        with tempfile.TemporaryDirectory(prefix="tidegate-wrk-") as out:
            mode = "mix" if rate else "critical"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.monotonic()
            done = subprocess.run(
                ["wrk", "-t", str(self.connections), "-c", str(self.connections),
                 "-d", f"{seconds:.0f}s", "--timeout", "10s", "-s",
                 str(ROOT / "bench" / "api_overload.lua"), f"http://127.0.0.1:{self.port}",
                 "--", out, self.path, str(rate or 0), str(self.connections), mode],
                capture_output=True, text=True, timeout=seconds + 60)
            took = time.monotonic() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.client_cpu_s = (after.ru_utime - before.ru_utime
                                 + after.ru_stime - before.ru_stime)
            if done.returncode:
                raise SystemExit(f"wrk failed: {done.stderr or done.stdout}")
            errors = [line for line in done.stdout.splitlines() if line.startswith("wrk:")]
            self.wrk_summary = errors[-1] if errors else done.stdout[-300:]
            for file in Path(out).glob("wrk-*.txt"):
                for line in file.read_text().splitlines():
                    status_s, why, priority, ms, late = line.split()
                    status, seconds_taken = int(status_s), float(ms) / 1000
                    self.results.append((priority, status, seconds_taken))
                    self.reasons[(status, f"{why} {priority}")].append(seconds_taken)
                    self.late_ms.append(float(late))
        self.late = sum(1 for v in self.late_ms if v > 10)
        # wrk's -d counts from its start; the schedule starts 50 ms in
        return min(took, seconds)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(label: str, load: Load | WrkLoad, took: float) -> dict[int, dict[str, float]]:
    by_status: dict[int, list[float]] = defaultdict(list)
    for _, status, seconds in load.results:
        by_status[status].append(seconds)
    out = {}
    print(f"{label}: {len(load.results)} answers in {took:.1f} s "
          f"({len(load.results) / took:.0f}/s), {load.late} sent > 10 ms behind schedule by "
          f"the client" + (f" (p99 {pct(load.late_ms, 0.99):.1f} ms, max "
                           f"{max(load.late_ms):.1f} ms)" if getattr(load, "late_ms", None)
                           else ""))
    if getattr(load, "cpu_note", None):
        print(load.cpu_note)
    for status in sorted(by_status):
        v = by_status[status]
        out[status] = s = {"n": len(v), "rate": len(v) / took, "p50": pct(v, 0.5) * 1000,
                           "p99": pct(v, 0.99) * 1000, "max": max(v) * 1000}
        print(f"  {status:3d}  n={s['n']:6d}  {s['rate']:7.0f}/s  p50 {s['p50']:7.1f} ms  "
              f"p99 {s['p99']:7.1f} ms  max {s['max']:7.1f} ms")
    for (status, why), v in sorted(load.reasons.items()):
        print(f"       {status:3d} {why:28s} n={len(v):6d}  p50 {pct(v, 0.5) * 1000:7.1f} ms  "
              f"p99 {pct(v, 0.99) * 1000:7.1f} ms")
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of process ``pid`` and its live descendants (uvicorn's
    worker processes with ``--api-workers``), from Linux /proc."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo.extend(child for child, ppid in parent.items() if ppid == p)
    return total / os.sysconf("SC_CLK_TCK")


def drive(load: Load | WrkLoad, seconds: float, rate: float | None, pid: int) -> float:
    """Run one phase; afterwards print what the API process got of the machine meanwhile: on
    a shared 2-core machine a slow answer may be a server that was not scheduled."""
    cpu0, load0 = cpu_seconds(pid), os.getloadavg()[0]
    took = (load.run(seconds, rate) if isinstance(load, WrkLoad)
            else asyncio.run(load.run(seconds, rate)))
    cpu = load.cpu_s = cpu_seconds(pid) - cpu0
    load.cpu_note = (f"  api process: {cpu:.1f} CPU-s in {took:.1f} s ({cpu / took:.0%} of one "
                     f"core), {cpu * 1000 / max(1, len(load.results)):.2f} ms CPU per answer; "
                     f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on "
                     f"{os.cpu_count()} cores"
                     + (f"; the client (wrk) {load.client_cpu_s:.1f} CPU-s"
                        if isinstance(load, WrkLoad) else ""))
    return took


def budget(rate: float, accept_ms: float, refuse_ms: float) -> None:
    """The least CPU the API process needs at ``rate`` requests/s: every CRITICAL request (its
    share of :data:`MIX`) accepted at phase 1's CPU per accepted job, every other one refused
    at the floor's CPU per answer (nothing cheaper answers HTTP here). Above ~80% of one core,
    requests wait for the one core a Python process has, whatever the code decides (docs:
    bench/RESULTS.md)."""
    critical = MIX.count("critical") / len(MIX)
    need = rate * (critical * accept_ms + (1 - critical) * refuse_ms) / 1000
    print(f"\nleast API CPU at the offered load: {need:.0%} of one core ({rate:.0f}/s x "
          f"({critical:.0%} x {accept_ms:.2f} ms per accepted job in phase 1 + "
          f"{1 - critical:.0%} x {refuse_ms:.2f} ms per floor answer)); refusal/accept CPU = "
          f"{refuse_ms / max(accept_ms, 1e-9):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="overload phase length")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load x capacity")
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--api-workers", type=int, default=1,
                        help="API processes (as tidegate api --workers N)")
    parser.add_argument("--client", choices=("wrk", "python"),
                        default="wrk" if shutil.which("wrk") else "python",
                        help="load generator: wrk (default where installed) or asyncio")
    parser.add_argument("--broker", choices=("redis", "amqp"), default="redis",
                        help="redis: a private redis-server (default); amqp: the local "
                             "RabbitMQ, publisher confirms as shipped, a vhost of the run's own")
    args = parser.parse_args()
    random.seed(7)
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-api-") as tmp:
        server = Server(Path(tmp), args.api_workers, args.broker)
        try:
            port = server.port
            make = WrkLoad if args.client == "wrk" else Load
            cap = make(port, "/v1/jobs", 32)
            took = drive(cap, 4.0, None, server.api.pid)
            accepted = sum(1 for _, s, _ in cap.results if s == 202)
            capacity = accepted / took
            accept_ms = cap.cpu_s * 1000 / max(1, accepted)
            rate = args.factor * capacity
            print(f"capacity R = {capacity:.0f} accepted jobs/s (closed loop, 32 connections, "
                  f"CRITICAL only); offered load {args.factor:.0f}R = {rate:.0f} requests/s over "
                  f"{args.connections} connections for {args.seconds:.0f} s; mix 10% CRITICAL, "
                  f"30% HIGH/MEDIUM/LOW, 1 in 5 from a token over its {CLIENT_RATE}/s rate; "
                  f"{args.api_workers} API process(es), broker {args.broker}, client "
                  f"{args.client}\n")
            over = make(port, "/v1/jobs", args.connections)
            api = report("api  /v1/jobs", over, drive(over, args.seconds, rate, server.api.pid))
            floor_load = make(port, "/bench/floor", args.connections)
            floor = report("floor /bench/floor", floor_load,
                           drive(floor_load, args.seconds, rate, server.api.pid))
            budget(args.factor * capacity, accept_ms,
                   floor_load.cpu_s * 1000 / max(1, len(floor_load.results)))
            crit = [s for p, s, _ in over.results if p == "critical"]
            crit_ok = sum(1 for s in crit if s == 202)
            slow = sum(1 for _, _, t in over.results if t > SLOW_S)
            floor_p99 = floor.get(503, {}).get("p99", float("nan"))
            print(f"\nCRITICAL accepted {crit_ok}/{len(crit)} "
                  f"({crit_ok / max(1, len(crit)):.1%}); answers slower than 1 s: {slow}; "
                  f"errors/timeouts: {api.get(0, {}).get('n', 0)}")
            misses = []
            for status in (429, 503):
                if status in api:
                    p99 = api[status]["p99"]
                    ratio = p99 / floor_p99
                    print(f"ratio {status} p99 / floor 503 p99 = {ratio:.2f}x "
                          f"({p99:.1f} ms / {floor_p99:.1f} ms)")
                    if p99 > 50:
                        misses.append(f"{status} p99 {p99:.1f} ms > 50 ms by {p99 - 50:.1f} ms")
                    if ratio > 3:
                        misses.append(f"{status} p99 is {ratio:.2f}x the floor (target <= 3x)")
            if 202 in api and api[202]["p99"] > MAX_WAIT_MS + 50:
                misses.append(f"202 p99 {api[202]['p99']:.1f} ms > {MAX_WAIT_MS + 50} ms by "
                              f"{api[202]['p99'] - MAX_WAIT_MS - 50:.1f} ms")
            if slow:
                misses.append(f"{slow} answers slower than 1 s")
            if crit_ok < len(crit):
                misses.append(f"CRITICAL accepted {crit_ok}/{len(crit)}")
            print("targets: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
            if server.api.output().count("Traceback"):
                print("api log has tracebacks:\n" + server.api.output()[-2000:])
                return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
