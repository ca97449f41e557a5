"""State and broker load: Redis commands and bytes, AMQP frames, per job, per guarded call and
per polling process, counted on private servers (docs/scaling.md turns them into limits).

Every figure is counted, not timed: each part runs against Redis servers this script starts on
free loopback ports (``INFO commandstats`` / ``INFO stats`` deltas, the snapshots' own bytes
taken out; a MONITOR stream tells commands sent from commands run inside scripts), and a
RabbitMQ node it starts too (other node name and ports; the machine's node, vhost
``tidegate_bench``, if it cannot) through a loopback proxy that counts AMQP frames by method.
Parts:

* per job, end to end: ``Producer.enqueue`` in this process, one real worker
  (``celery worker -P threads -c 4``) running bench/tasks.py; by kind (idempotent, keyed, not
  idempotent; success, failure to the DLQ; deferred by the producer while the circuit is open).
  The worker's idle rate, measured first, is taken out of each run's counts.
* per guarded call: ``Policy.call`` in this process on a ``RedisStore``, paced at
  ``--call-rate`` calls/s (success counts are merged in batches, so the per-call figure
  depends on the rate: a figure per call *at that rate*).
* polling: idle workers (threads on each broker, prefork on Redis), the Redis worker once
  its jobs are done (its 5 s publishers), the exporter (``tidegate exporter``, its 1 s
  sampling), and producer processes enqueuing at ``--producer-rate`` jobs/s each (1 and 3).
* Redis CPU per job: one more batch of successful idempotent jobs with MONITOR off, the
  servers' ``used_cpu_user + used_cpu_sys`` before and after (what one Redis core can carry);
  RabbitMQ CPU per message: the private node's ``beam.smp`` CPU time over the per-job runs.
* ``redis-benchmark`` against a private server: this machine's Redis ops/s, a cross-check.

    .venv/bin/python bench/state_load.py [--jobs 60] [--brokers redis amqp]

Bounded (~40-45 s on the shared 2-core machine) and loopback only. Figures are per job or per
second of one process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tasks import ATTEMPTS, COUNTER  # noqa: E402
from tidegate.stack import BIN, Proc, Worker, ensure_vhost, free_port, wait_until  # noqa: E402

RABBIT = "127.0.0.1", 5672
VHOST = "tidegate_bench"
WORKER_CONCURRENCY = 4


# -- Redis counting --------------------------------------------------------------------------
@dataclass
class Counts:
    """What a server did between two snapshots: calls per command, bytes in and out."""

    calls: Counter = field(default_factory=Counter)
    bytes_in: float = 0.0
    bytes_out: float = 0.0
    client: float = 0.0  # commands clients sent (MONITOR), scripts' own calls not included
    script: float = 0.0  # commands run inside Lua scripts

    @property
    def total(self) -> float:
        return sum(self.calls.values())

    def minus(self, other: Counts, scale: float = 1.0) -> Counts:
        calls = Counter({k: v - other.calls.get(k, 0) * scale for k, v in self.calls.items()})
        return Counts(calls, self.bytes_in - other.bytes_in * scale,
                      self.bytes_out - other.bytes_out * scale,
                      self.client - other.client * scale, self.script - other.script * scale)

    def per(self, n: float) -> Counts:
        return Counts(Counter({k: v / n for k, v in self.calls.items()}), self.bytes_in / n,
                      self.bytes_out / n, self.client / n, self.script / n)

    def top(self, k: int = 4, floor: float = 0.05) -> str:
        items = [(c, v) for c, v in self.calls.most_common() if v >= floor][:k]
        return " ".join(f"{c}:{v:.2f}".replace(".00", "") for c, v in items) or "-"


def _resp(*parts: str) -> int:
    """Bytes of a RESP request array (what the server counts as input)."""
    return len(f"*{len(parts)}\r\n") + sum(len(f"${len(p)}\r\n{p}\r\n") for p in parts)


class Monitor:
    """A ``MONITOR`` stream on its own socket: tells the commands clients sent from those a
    Lua script ran (``[0 lua]``), which ``INFO commandstats`` counts alike, and how many bytes
    the stream itself cost (taken out of the server's output bytes)."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self.client = self.script = self.bytes = 0
        self._marks: dict[str, tuple[int, int, int]] = {}
        self._seen = threading.Condition(self._lock)
        threading.Thread(target=self._read, daemon=True, name="redis-monitor").start()

    def _read(self) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := self._sock.recv(65536):
                buf += data
                *lines, buf = buf.split(b"\r\n")
                with self._lock:
                    for line in lines:
                        self.bytes += len(line) + 2
                        head, _, args = line.partition(b"] ")
                        name = args.split(b" ", 1)[0].strip(b'"').lower()
                        if name == b"echo" and b"tidegate-bench-mark-" in args:
                            self._marks[args.split(b" ")[1].strip(b'"').decode()] = (
                                self.client, self.script, self.bytes)
                            self._seen.notify_all()
                        elif name in (b"info", b"echo", b""):
                            continue
                        elif head.endswith(b" lua"):
                            self.script += 1
                        else:
                            self.client += 1

    def at(self, mark: str) -> tuple[int, int, int]:
        """(client commands, script commands, stream bytes) when ``mark`` went by."""
        with self._lock:
            if not self._seen.wait_for(lambda: mark in self._marks, 10):
                raise AssertionError(f"MONITOR never showed {mark}")
            return self._marks.pop(mark)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


class RedisServer:
    """A private ``redis-server`` on a free loopback port, counted with INFO snapshots and a
    MONITOR stream (``client`` and ``script`` counts in :class:`Counts`)."""

    def __init__(self, tmp: Path, name: str, monitor: bool = True) -> None:
        self.port = free_port()
        self.name = name
        self.proc = Proc(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", str(tmp)], {},
                         tmp / f"redis-{name}.log", f"redis-{name}")
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        wait_until(self.client.ping, 10, message=f"private redis {name} on {self.port}")
        self._conn = self.client.connection_pool.get_connection()
        self.monitor = Monitor(self.port) if monitor else None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _snapshot(self) -> tuple[Counts, int, str]:
        """(totals so far, wire size of this snapshot's reply, its MONITOR mark)."""
        self._conn.send_command("INFO", "stats", "commandstats")
        raw = self._conn.read_response()
        mark = f"tidegate-bench-mark-{uuid.uuid4().hex}"
        self._conn.send_command("ECHO", mark)
        self._conn.read_response()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        counts = Counts()
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line.partition(":")
                cmd = name[len("cmdstat_"):]
                if cmd not in ("info", "echo", "monitor"):
                    counts.calls[cmd] = int(re.search(r"calls=(\d+)", rest).group(1))
            elif line.startswith("total_net_input_bytes:"):
                counts.bytes_in = int(line.split(":")[1])
            elif line.startswith("total_net_output_bytes:"):
                counts.bytes_out = int(line.split(":")[1])
        size = len(raw) if isinstance(raw, bytes) else len(text.encode())
        return counts, len(f"${size}\r\n") + size + 2, mark

    def start(self) -> None:
        self._mark = self._snapshot()

    def stop(self) -> Counts:
        """Counts since :meth:`start` (the snapshots' and the MONITOR stream's own traffic
        taken out)."""
        (before, reply, mark0), (after, _, mark1) = self._mark, self._snapshot()
        delta = after.minus(before)
        mark_len = len(mark0)
        delta.bytes_in -= _resp("INFO", "stats", "commandstats") + _resp("ECHO", "x" * mark_len)
        delta.bytes_out -= reply + len(f"${mark_len}\r\n") + mark_len + 2
        delta.calls = Counter({k: v for k, v in delta.calls.items() if v})
        if self.monitor is not None:
            (c0, s0, b0), (c1, s1, b1) = self.monitor.at(mark0), self.monitor.at(mark1)
            delta.client, delta.script = c1 - c0, s1 - s0
            delta.bytes_out -= b1 - b0
        return delta

    def cpu(self) -> float:
        """Seconds of CPU the server has used (user + system, all its threads)."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def monitoring(self, on: bool) -> None:
        """MONITOR costs the server CPU of its own: off while CPU is measured."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if on:
            self.monitor = Monitor(self.port)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        self._conn.disconnect()
        self.client.close()
        self.proc.stop()


@contextlib.contextmanager
def measuring(*servers: Any) -> Iterator[dict[str, Counts]]:
    """Counts per server (or AMQP proxy) for the ``with`` block."""
    out: dict[str, Counts] = {}
    for s in servers:
        s.start()
    yield out
    for s in servers:
        out[s.name] = s.stop()


# -- AMQP counting ---------------------------------------------------------------------------
METHODS = {
    (10, 10): "connection.start", (10, 11): "connection.start-ok", (10, 30): "connection.tune",
    (10, 31): "connection.tune-ok", (10, 40): "connection.open", (10, 41): "connection.open-ok",
    (10, 50): "connection.close", (10, 51): "connection.close-ok",
    (20, 10): "channel.open", (20, 11): "channel.open-ok", (20, 40): "channel.close",
    (20, 41): "channel.close-ok", (20, 20): "channel.flow", (20, 21): "channel.flow-ok",
    (40, 10): "exchange.declare", (40, 11): "exchange.declare-ok",
    (50, 10): "queue.declare", (50, 11): "queue.declare-ok", (50, 20): "queue.bind",
    (50, 21): "queue.bind-ok", (50, 30): "queue.purge", (50, 31): "queue.purge-ok",
    (60, 10): "basic.qos", (60, 11): "basic.qos-ok", (60, 20): "basic.consume",
    (60, 21): "basic.consume-ok", (60, 30): "basic.cancel", (60, 31): "basic.cancel-ok",
    (60, 40): "basic.publish", (60, 50): "basic.return", (60, 60): "basic.deliver",
    (60, 70): "basic.get", (60, 71): "basic.get-ok", (60, 72): "basic.get-empty",
    (60, 80): "basic.ack", (60, 90): "basic.reject", (60, 110): "basic.recover",
    (60, 120): "basic.nack", (85, 10): "confirm.select", (85, 11): "confirm.select-ok",
}


class AmqpCounter:
    """A loopback TCP proxy to RabbitMQ that counts frames by direction and method.

    Calls are keyed ``c>basic.publish`` (client to server) or ``s>basic.deliver``; content
    header and body frames as ``c>header``/``c>body``; heartbeats as ``heartbeat``."""

    def __init__(self, name: str = "amqp", upstream: tuple[str, int] = RABBIT,
                 vhost: str = VHOST) -> None:
        self.name = name
        self.upstream, self.vhost = upstream, vhost
        self.port = free_port()
        self._lock = threading.Lock()
        self._counts = Counts()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="amqp-proxy").start()

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(self.vhost, safe='')}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
            for src, dst, tag in ((client, upstream, "c"), (upstream, client, "s")):
                threading.Thread(target=self._pump, args=(src, dst, tag), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, tag: str) -> None:
        buf = b""
        header_done = tag == "s"
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                buf += data
                if not header_done and len(buf) >= 8:  # b"AMQP\x00\x00\x09\x01"
                    buf, header_done = buf[8:], True
                found: list[str] = []
                while header_done and len(buf) >= 7:
                    kind, _channel, size = struct.unpack(">BHI", buf[:7])
                    if len(buf) < size + 8:
                        break
                    payload, buf = buf[7:7 + size], buf[size + 8:]
                    if kind == 1:
                        cls, meth = struct.unpack(">HH", payload[:4])
                        found.append(f"{tag}>{METHODS.get((cls, meth), f'{cls}.{meth}')}")
                    else:
                        found.append({2: f"{tag}>header", 3: f"{tag}>body"}.get(kind,
                                                                                "heartbeat"))
                with self._lock:
                    self._counts.calls.update(found)
                    if tag == "c":
                        self._counts.bytes_in += len(data)
                    else:
                        self._counts.bytes_out += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _snap(self) -> Counts:
        with self._lock:
            return Counts(Counter(self._counts.calls), self._counts.bytes_in,
                          self._counts.bytes_out)

    def start(self) -> None:
        self._mark = self._snap()

    def stop(self) -> Counts:
        delta = self._snap().minus(self._mark)
        delta.calls = Counter({k: v for k, v in delta.calls.items() if v})
        return delta

    def close(self) -> None:
        self._closed = True
        self._sock.close()


# NB: a publish waits for its confirm (basic.ack from the server) and every method named
# here waits for its -ok: those are the round trips a client sits out.
SYNC = ("queue.declare", "exchange.declare", "queue.bind", "basic.qos", "basic.consume",
        "channel.open", "confirm.select", "basic.get", "queue.purge", "basic.cancel")


def amqp_round_trips(c: Counts) -> float:
    return sum(v for k, v in c.calls.items() if k[2:] in SYNC and k.startswith("c>")) + \
        c.calls.get("s>basic.ack", 0)


class PrivateRabbit:
    """A RabbitMQ node of the bench's own (other node name and ports, no plugins, its data
    under ``tmp``), so that its CPU time is this bench's traffic alone. Erlang's schedulers
    do not busy-wait (``+sbwt none``), or idle spinning would count as work."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "rabbitmq"
        self.dir.mkdir()
        self.port = free_port()
        (self.dir / ".erlang.cookie").write_text(uuid.uuid4().hex)
        (self.dir / ".erlang.cookie").chmod(0o400)
        (self.dir / "enabled_plugins").write_text("[].")
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nlog.console = false\n"
            "log.file.level = warning\n")
        server = next((c for c in ("/usr/lib/rabbitmq/bin/rabbitmq-server",
                                   "/usr/local/lib/rabbitmq/bin/rabbitmq-server")
                       if Path(c).exists()), None)
        if server is None:
            raise FileNotFoundError("rabbitmq-server (the package's own script)")
        name = f"tidegate-bench-{uuid.uuid4().hex[:6]}@localhost"
        env = {"HOME": str(self.dir), "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
               "RABBITMQ_NODENAME": name, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
               "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
               "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
               "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
               "RABBITMQ_LOG_BASE": str(self.dir / "log"), "ERL_EPMD_ADDRESS": "127.0.0.1",
               "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+sbwt none +sbwtdcpu none +sbwtdio none"}
        self.proc = Proc([server], env, tmp / "rabbitmq.log", "rabbitmq")

    def _speaks_amqp(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1)[:1] == b"\x01"  # connection.start

    def wait_ready(self, timeout: float = 60.0) -> PrivateRabbit:
        wait_until(lambda: not self.proc.alive() or self._speaks_amqp(), timeout, interval=0.25,
                   message=f"private RabbitMQ on {self.port}")
        if not self.proc.alive():
            raise RuntimeError(f"private RabbitMQ died: {self.proc.output()[-2000:]}")
        self.beam = self._beam(self.proc.pid)
        return self

    @staticmethod
    def _beam(pid: int) -> int:
        """The Erlang VM under the launcher script (or the launcher itself once exec'd)."""
        todo = [pid]
        while todo:
            p = todo.pop()
            with contextlib.suppress(OSError):
                if Path(f"/proc/{p}/comm").read_text().strip().startswith("beam"):
                    return p
                todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        raise RuntimeError("no beam.smp under the private RabbitMQ")

    def cpu(self) -> float:
        """Seconds of CPU the node has used (user + system)."""
        fields = Path(f"/proc/{self.beam}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.kill()
        self.proc.stop()


# -- the stack -------------------------------------------------------------------------------
def bench_policy(tmp: Path) -> Path:
    """The shipped policy, with the search dependency's queue retries in milliseconds, a
    not-idempotent dependency for bench.resilient_fail_once, breakers that never open on the
    failure runs, and watermarks no run reaches."""
    text = (ROOT / "workers" / "policy.toml").read_text()
    text += """
[dependencies.search.retry]
base_s = 0.01
max_wait_s = 0.05
pause_ms = 1
[dependencies.search.breaker]
minimum_calls = 1000000

[dependencies.benchonce]          # bench.resilient_fail_once's effect: not idempotent
queue = "search"
url = "http://127.0.0.1:9"
tasks = []
idempotent = false
[dependencies.benchonce.breaker]
minimum_calls = 1000000

[backpressure]
low_watermark = 1000000
high_watermark = 2000000
"""
    path = tmp / "policy.toml"
    path.write_text(text)
    return path


def env_for(broker_url: str, state_url: str, policy: Path, counter_url: str) -> dict[str, str]:
    return {"TIDEGATE_BROKER_URL": broker_url, "TIDEGATE_REDIS_URL": state_url,
            "TIDEGATE_POLICY_FILE": str(policy), "TIDEGATE_BENCH_COUNTER_URL": counter_url,
            "TIDEGATE_SQS_ENDPOINT_URL": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_worker(env: dict[str, str], tmp: Path, pool: str = "threads",
                 concurrency: int = WORKER_CONCURRENCY) -> Worker:
    return Worker("default", env, tmp, pool=pool, concurrency=concurrency,
                  extra=("-I", "bench.tasks"))


# -- per job ---------------------------------------------------------------------------------
@dataclass
class Kind:
    label: str
    task: str
    keyed: bool = False
    fails: bool = False
    deferred: bool = False


KINDS = [
    Kind("idempotent, success", "bench.resilient_noop"),
    Kind("keyed, success", "bench.resilient_noop_once", keyed=True),
    Kind("not idempotent, success", "bench.resilient_noop_once"),
    Kind("idempotent, failure -> DLQ", "bench.resilient_fail", fails=True),
    Kind("not idempotent, failure -> DLQ", "bench.resilient_fail_once", fails=True),
    Kind("deferred (circuit open)", "email.send", deferred=True),
]


class JobRunner:
    """Runs N jobs of a kind through a Producer and one worker, and counts what they cost."""

    def __init__(self, broker: str, broker_url: str, state: RedisServer, counter: RedisServer,
                 meters: list[Any], dlq_count: Callable[[], int], dlq_poll_cost: Counts | None,
                 policy: Path) -> None:
        from producers import Producer
        from producers.deferral import DeferralGate
        from resilience.breaker import CircuitBreaker
        from resilience.fallback import MemoryDeferralSink
        from resilience.policy import PolicyConfig
        from resilience.stores import RedisStore, redis_client
        from workers.application import create_app
        from workers.installation import installation
        from workers.settings import load_settings

        self.broker = broker
        settings = load_settings(broker_url=broker_url, redis_url=state.url(),
                                 policy_file=policy)
        self.app = create_app(settings)
        self.app.loader.import_default_modules()
        import bench.tasks  # noqa: F401  (the bench tasks, in this process too)

        topology = installation(self.app).topology
        self.producer = Producer(self.app)
        # Deferral into memory: the SQS side of a deferral is one SendMessage (not counted).
        email = next(d for d in topology.dependencies if d.name == "email")
        self.email_cfg = PolicyConfig.from_mapping("email", email.policy).breaker
        self.store = RedisStore(redis_client(state.url(), socket_timeout=2.0,
                                              socket_connect_timeout=2.0), name="producer")
        breaker = CircuitBreaker("email", self.email_cfg, self.store)
        sink = MemoryDeferralSink()
        self.deferring = Producer(self.app, throttle=self.producer.throttle,
                                  jobs=self.producer.jobs,
                                  deferral=DeferralGate(topology, {"email": breaker},
                                                        lambda _dep: sink))
        self.state, self.counter, self.meters = state, counter, meters
        self.dlq_count, self.dlq_poll_cost = dlq_count, dlq_poll_cost

    def run(self, kind: Kind, n: int, idle: dict[str, Counts], idle_s: float
            ) -> tuple[dict[str, Counts], float]:
        self.counter.client.set(COUNTER, 0)
        self.counter.client.set(ATTEMPTS, 0)
        if kind.deferred:
            self.store.breaker_force("email", self.email_cfg, "open", 60.0)
        dlq_before = self.dlq_count() if kind.fails else 0
        polls = 0
        started = time.monotonic()
        with measuring(*self.meters) as counts:
            run_id = uuid.uuid4().hex[:8]
            producer = self.deferring if kind.deferred else self.producer
            for i in range(n):
                key = f"cap-{run_id}-{i}" if kind.keyed else None
                result = producer.enqueue(kind.task, [i] if not kind.deferred else
                                          ["someone@example.com", "hello", f"{i}"],
                                          idempotency_key=key)
                assert result.state == ("deferred" if kind.deferred else "queued"), result
            if kind.fails:
                def done() -> bool:
                    nonlocal polls
                    polls += 1
                    return self.dlq_count() - dlq_before >= n
                wait_until(done, 60, interval=0.2, message=f"{n} jobs dead-lettered")
            elif not kind.deferred:
                wait_until(lambda: int(self.counter.client.get(COUNTER) or 0) >= n, 60,
                           interval=0.05, message=f"{n} {kind.label} jobs")
            time.sleep(0.3)  # the worker's unanswered marks and acks land
        elapsed = time.monotonic() - started
        if kind.deferred:
            self.store.breaker_force("email", self.email_cfg, "closed", 0.0)
        out = {}
        for name, c in counts.items():
            c = c.minus(idle[name], elapsed / idle_s)
            if name == "broker" and self.dlq_poll_cost is not None:
                c = c.minus(self.dlq_poll_cost, polls)
            out[name] = c.per(n)
        return out, int(self.counter.client.get(ATTEMPTS) or 0) / n

    def close(self) -> None:
        self.app.close()


def redis_cpu(runner: JobRunner, servers: list[RedisServer], n: int,
              idle: dict[str, Counts], idle_s: float) -> dict[str, float]:
    """CPU seconds per successful idempotent job on each server, with MONITOR off and the
    servers' own idle CPU (their timers) over the same time taken out."""
    for s in servers:
        s.monitoring(False)
    try:
        before = {s.name: s.cpu() for s in servers}
        time.sleep(1.0)
        mid = {s.name: s.cpu() for s in servers}
        started = time.monotonic()
        runner.run(KINDS[0], n, idle, idle_s)
        took = time.monotonic() - started
        after = {s.name: s.cpu() for s in servers}
        return {k: max(0.0, (after[k] - mid[k]) - (mid[k] - before[k]) * took) / n
                for k in after}
    finally:
        for s in servers:
            s.monitoring(True)


def redis_dlq(server: RedisServer) -> tuple[Callable[[], int], Callable[[], None]]:
    from workers.brokers.redis import RedisDepthProbe

    lists = RedisDepthProbe(server.client).lists("default.dlq")
    client = redis.Redis(port=server.port, socket_timeout=5)

    def count() -> int:
        pipe = client.pipeline(transaction=False)
        for name in lists:
            pipe.llen(name)
        return sum(pipe.execute())
    return count, count


def amqp_dlq(proxy: AmqpCounter) -> Callable[[], int]:
    """The DLQ's depth, read straight from the node (not through the counting proxy)."""
    from kombu import Connection

    host, port = proxy.upstream
    conn = Connection(f"amqp://guest:guest@{host}:{port}/{quote(proxy.vhost, safe='')}",
                      connect_timeout=5)

    def count() -> int:
        try:
            return conn.default_channel.queue_declare("default.dlq", passive=True).message_count
        except Exception:  # declared by the worker at start; 0 until then
            conn.close()
            return 0
    return count


# -- per guarded call ------------------------------------------------------------------------
def guarded_calls(server: RedisServer, rate: float, seconds: float) -> list[tuple[str, Counts,
                                                                                  int]]:
    """Policy.call on a RedisStore, paced at ``rate``: per call, by kind and outcome."""
    from resilience.errors import TransientError
    from resilience.fallback import MemoryDeferralSink
    from resilience.policy import Policy, PolicyConfig
    from resilience.stores import RedisStore

    client = redis.Redis(port=server.port, socket_timeout=2)
    store = RedisStore(client)

    def ok() -> int:
        return 1

    def fail() -> int:
        raise TransientError("down")

    def policy(name: str, idempotent: bool, deferring: bool = False) -> Policy:
        cfg = PolicyConfig.from_mapping(name, {
            "idempotent": idempotent, "timeout_ms": 80, "deadline_ms": 200,
            **({"retry": {"pause_ms": 0.2}} if idempotent else {}),
            "breaker": {"minimum_calls": 10 ** 6},
            **({"fallback": {"kind": "queue"}} if deferring else {})})
        return Policy(cfg, store=store, deferral_sink=MemoryDeferralSink())

    cases: list[tuple[str, Policy, Callable[[], int], bool]] = [
        ("idempotent, success", policy("cap-idem", True), ok, False),
        ("keyed, success", policy("cap-keyed", False), ok, True),
        ("not idempotent, success", policy("cap-once", False), ok, False),
        ("idempotent, failure", policy("cap-idem-f", True), fail, False),
        ("keyed, failure", policy("cap-keyed-f", False), fail, True),
        ("not idempotent, failure", policy("cap-once-f", False), fail, False),
    ]
    deferring = policy("cap-defer", True, deferring=True)
    store.breaker_force("cap-defer", deferring.config.breaker, "open", 60.0)
    cases.append(("deferred (circuit open)", deferring, ok, False))
    rows = []
    for label, pol, fn, keyed in cases:
        if fn is ok:
            pol.call(fn)  # scripts registered, clients connected
        calls = 0
        with measuring(server) as counts:
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                with contextlib.suppress(Exception):
                    pol.call(fn, idempotency_key=f"k{calls}" if keyed else None)
                calls += 1
                time.sleep(max(0.0, start + calls / rate - time.monotonic()))
            time.sleep(0.2)  # the last success batch is merged (every 0.1 s)
        rows.append((label, counts[server.name].per(calls), calls))
    client.close()
    return rows


# -- polling processes -----------------------------------------------------------------------
def producer_child(broker_url: str, state_url: str, rate: float, seconds: float) -> None:
    """One producer process enqueuing at ``rate`` jobs/s (``--producer-child``)."""
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=broker_url, redis_url=state_url))
    app.loader.import_default_modules()
    import bench.tasks  # noqa: F401

    producer = Producer(app)
    producer.enqueue("bench.resilient_noop", [0])  # connected, scripts loaded
    print("ready", flush=True)
    while sys.stdin.readline():  # the parent says go for each run, or closes stdin
        start, sent = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            producer.enqueue("bench.resilient_noop", [sent])
            sent += 1
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        time.sleep(0.2)
        print(f"sent {sent}", flush=True)


class ProducerChildren:
    """Producer processes started early (they import while other parts run); :meth:`run`
    releases ``k`` of them at once for one run."""

    def __init__(self, broker: RedisServer, state: RedisServer, env: dict[str, str], n: int,
                 rate: float, seconds: float) -> None:
        self.broker, self.state, self.seconds = broker, state, seconds
        self.children = [subprocess.Popen(
            [sys.executable, __file__, "--producer-child", broker.url(), state.url(),
             str(rate), str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=ROOT, env={**os.environ, **env}) for _ in range(n)]
        self.ready: set[int] = set()

    def run(self, k: int) -> tuple[dict[str, Counts], int]:
        """Release ``k`` children at once: (counts on both servers, jobs they sent)."""
        children = self.children[:k]
        for c in children:
            if c.pid not in self.ready:
                assert c.stdout.readline().strip() == "ready", "producer child failed to start"
                self.ready.add(c.pid)
        with measuring(self.broker, self.state) as counts:
            for c in children:
                c.stdin.write("go\n")
                c.stdin.flush()
            sent = sum(int(c.stdout.readline().split()[1]) for c in children)
        return counts, sent

    def close(self) -> None:
        for c in self.children:
            with contextlib.suppress(OSError):
                c.stdin.close()
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()


class Exporter:
    """``tidegate exporter`` on servers of its own, counted from :meth:`start` to :meth:`stop`."""

    def __init__(self, broker: RedisServer, state: RedisServer, env: dict[str, str],
                 tmp: Path) -> None:
        self.broker, self.state = broker, state
        self.port = free_port()
        self.proc = Proc([str(BIN / "tidegate"), "exporter", "--port", str(self.port)], env,
                         tmp / "exporter.log", "exporter")

    def _get(self) -> int:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).status_code

    def start(self) -> None:
        wait_until(lambda: self._get() == 200, 60, interval=0.2, message="exporter up")
        self.broker.start()
        self.state.start()
        self.began = time.monotonic()

    def stop(self) -> tuple[dict[str, Counts], float]:
        """(counts per server while it sampled, seconds). A scrape adds nothing while the
        observer's last snapshot is younger than its TTL (1 s), so this is its whole load."""
        idle = {s.name: s.stop() for s in (self.broker, self.state)}
        return idle, time.monotonic() - self.began

    def close(self) -> None:
        self.proc.kill()  # no graceful stop to wait for
        self.proc.stop()


# -- capacity --------------------------------------------------------------------------------
def redis_capacity(server: RedisServer) -> list[tuple[str, float]]:
    """redis-benchmark on loopback, 50 clients: requests/s, one command per request, 16
    pipelined, and a one-key script (most of Tidegate's state calls are scripts)."""
    rows = []
    for label, args in (("SET/GET/LPUSH, 1 per request", ["-t", "set,get,lpush"]),
                        ("the same, 16 pipelined", ["-t", "set,get,lpush", "-P", "16"]),
                        ("EVAL of a 1-key script", ["eval", "return redis.call('incr',KEYS[1])",
                                                    "1", "k"])):
        out = subprocess.run(["redis-benchmark", "-p", str(server.port), "-q", "-c", "50",
                              "-n", "5000", *args], capture_output=True, text=True, timeout=60)
        rates = [float(m) for m in re.findall(r"([\d.]+) requests per second", out.stdout)]
        rows.append((label, min(rates) if rates else 0.0))
    return rows


# -- main ------------------------------------------------------------------------------------
def fmt(c: Counts) -> str:
    """Redis: commands sent, commands run inside scripts, bytes in and out."""
    return f"{c.client:>7.2f}{c.script:>7.2f}{c.bytes_in:>8.0f}{c.bytes_out:>8.0f}"


def fmt_amqp(c: Counts) -> str:
    """AMQP: frames client->server, server->client, round trips, bytes in and out."""
    sent = sum(v for k, v in c.calls.items() if k.startswith("c>"))
    got = sum(v for k, v in c.calls.items() if k.startswith("s>"))
    return f"{sent:>7.2f}{got:>7.2f}{amqp_round_trips(c):>6.2f}{c.bytes_in:>8.0f}" \
           f"{c.bytes_out:>8.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--brokers", nargs="*", default=["redis", "amqp"])
    parser.add_argument("--call-rate", type=float, default=200.0)
    parser.add_argument("--producer-rate", type=float, default=50.0)
    parser.add_argument("--producer-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.producer_child:
        b, s, rate, secs = args.producer_child
        producer_child(b, s, float(rate), float(secs))
        return
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        policy = bench_policy(tmp)
        servers: list[RedisServer] = []
        try:
            run(args, tmp, policy, servers)
        finally:
            for s in servers:
                s.close()
    print(f"(took {time.monotonic() - began:.0f} s)")


def phase(msg: str, _began: list[float] = []) -> None:  # noqa: B006 (the run's start)
    """Progress on stderr, with seconds since the first call."""
    _began = _began or _began.append(time.monotonic()) or _began
    print(f"[{time.monotonic() - _began[0]:5.1f} s] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, tmp: Path, policy: Path, servers: list[RedisServer]) -> None:
    phase("starting servers, workers, producers, exporter")
    def server(name: str, monitor: bool = True) -> RedisServer:
        servers.append(RedisServer(tmp, name, monitor))
        return servers[-1]

    counter = server("counter")
    workers: dict[str, tuple[Worker, Any, RedisServer]] = {}
    procs: list[Any] = []
    try:
        # Start every process first: they boot while the in-process parts run.
        if "redis" in args.brokers:
            broker, state = server("broker"), server("state")
            w = start_worker(env_for(broker.url(), state.url(), policy, counter.url()), tmp)
            workers["redis"] = (w, broker, state)
        rabbit: PrivateRabbit | None = None
        if "amqp" in args.brokers:
            amqp_state = server("state")
            try:  # a node of our own boots meanwhile; its worker starts once it is up
                rabbit = PrivateRabbit(tmp)
                procs.append(rabbit)
                proxy = AmqpCounter("broker", ("127.0.0.1", rabbit.port), "/")
            except OSError as exc:
                print(f"(no private RabbitMQ node: {exc}; the shared one, CPU not measured)")
                ensure_vhost(VHOST)
                proxy = AmqpCounter("broker")
        # Prefork's children each hold state clients and periodic publishers of their own:
        # one idles beside the others, for its polling only.
        fb, fs = server("prefork-broker"), server("prefork-state")
        prefork = start_worker(env_for(fb.url(), fs.url(), policy, counter.url()), tmp,
                               pool="prefork", concurrency=2)
        procs.extend([*(w for w, *_ in workers.values()), prefork])
        pb, ps = server("prod-broker"), server("prod-state")
        producers = ProducerChildren(pb, ps, env_for(pb.url(), ps.url(), policy,
                                                     counter.url()),
                                     3, args.producer_rate, 2.0)
        procs.append(producers)
        eb, es = server("exp-broker"), server("exp-state")
        exporter = Exporter(eb, es, env_for(eb.url(), es.url(), policy, counter.url()), tmp)
        procs.append(exporter)

        phase("guarded calls")
        calls_server = server("calls")
        print(f"guarded calls: Policy.call on a RedisStore in one process, {args.call_rate:.0f} "
              "calls/s for 0.5 s per kind; per call: Redis commands sent, commands run inside "
              "scripts, bytes in/out")
        print(f"{'kind':<28}{'sent':>7}{'script':>7}{'B in':>8}{'B out':>8}  all commands")
        for label, c, _ in guarded_calls(calls_server, args.call_rate, 0.5):
            print(f"{label:<28}{fmt(c)}  {c.top(6)}")

        # Each worker idles on servers of its own while the polling parts run: its idle rate
        # is both a result and what its per-job runs take out.
        if "amqp" in args.brokers:
            if rabbit is not None:
                phase("waiting for the private RabbitMQ node")
                try:
                    rabbit.wait_ready(60)
                except (AssertionError, RuntimeError) as exc:
                    print(f"(the private RabbitMQ node did not start: {str(exc)[:200]}; the "
                          "shared one, CPU not measured)")
                    rabbit = None
                    ensure_vhost(VHOST)
                    proxy.upstream, proxy.vhost = RABBIT, VHOST
            w = start_worker(env_for(proxy.url(), amqp_state.url(), policy, counter.url()), tmp)
            procs.append(w)
            workers["amqp"] = (w, proxy, amqp_state)
        phase("waiting for the workers")
        for w in (*(w for w, *_ in workers.values()), prefork):
            w.wait_ready(90)
        time.sleep(1.0)  # the workers' start-up writes settle
        phase("exporter and producers")
        for _w, broker, state in (*workers.values(), (prefork, fb, fs)):
            broker.start()
            state.start()
        idle_began = time.monotonic()
        rabbit_idle = rabbit.cpu() if rabbit is not None else 0.0
        exporter.start()
        phase("exporter up; producers")

        print(f"\npolling: producer processes, each enqueuing {args.producer_rate:.0f} jobs/s "
              "for 2 s to one queue (Redis broker, no worker); Redis commands sent per "
              "second per producer, and per job")
        print(f"{'producers':<10}{'state/s':>9}{'per job':>9}{'broker/s':>10}{'per job':>9}"
              "  state / broker commands per job")
        for k in (1, 3):
            counts, sent = producers.run(k)
            st, br = counts["prod-state"], counts["prod-broker"]
            secs = producers.seconds * k
            print(f"{k:<10}{st.client / secs:>9.1f}{st.client / sent:>9.2f}"
                  f"{br.client / secs:>10.1f}{br.client / sent:>9.2f}  "
                  f"{st.per(sent).top(5)} / {br.per(sent).top(5)}")

        sampled, secs = exporter.stop()
        print(f"\npolling: one exporter (tidegate exporter, 1 s sampling) over {secs:.0f} s, "
              "Redis broker, 4 work queues; Redis commands sent per second")
        print(f"{'':<11}{'state/s':>8}{'broker/s':>9}  state / broker commands per second")
        ist, ibr = sampled["exp-state"].per(secs), sampled["exp-broker"].per(secs)
        print(f"{'sampling':<11}{ist.client:>8.1f}{ibr.client:>9.1f}  {ist.top(4)} / "
              f"{ibr.top(4)}")

        idle_s = time.monotonic() - idle_began
        if rabbit is not None:
            rabbit_idle = (rabbit.cpu() - rabbit_idle) / idle_s  # its own timers, per second
        idles = {name: {"broker": broker.stop(), "state": state.stop()}
                 for name, (_w, broker, state) in workers.items()}
        fst, fbr = fs.stop().per(idle_s), fb.stop().per(idle_s)
        prefork.kill()
        print(f"\npolling: one idle prefork worker (-P prefork -c 2, Redis broker) over "
              f"{idle_s:.0f} s: state {fst.client:.1f} sent/s ({fst.top(4)}), broker "
              f"{fbr.client:.1f} sent/s ({fbr.top(4)}); the threads workers' idle rates are "
              "with their per-job tables")
        after: tuple[str, Worker, Any, RedisServer, float] | None = None
        for name, (w, broker, state) in workers.items():
            phase(f"jobs on {name}")
            bench_broker(name, broker, state, counter, policy, args, idles[name], idle_s,
                         rabbit if name == "amqp" else None, rabbit_idle)
            if after is None and isinstance(broker, RedisServer):
                # idle again but with attempts and counts to publish: its 5 s publishers run
                # (latency share, counters) while the next broker's part runs
                broker.start()
                state.start()
                after = name, w, broker, state, time.monotonic()
            else:
                w.kill()  # done with it (its servers are private)
        if after is not None:
            name, w, broker, state, began = after
            secs = time.monotonic() - began
            ast, abr = state.stop().per(secs), broker.stop().per(secs)
            w.kill()
            print(f"\nthe {name} worker idle after its jobs, over {secs:.0f} s: state "
                  f"{ast.client:.1f} sent/s ({ast.top(5)}), broker {abr.client:.1f} sent/s")
        phase("redis-benchmark")
        cap = server("capacity", monitor=False)
        print("\nredis-benchmark on this machine (loopback, 50 clients, 5000 requests; the "
              "slowest command of each set)")
        for label, rate in redis_capacity(cap):
            print(f"{label:<40}{rate:>12,.0f} requests/s")
        phase("stopping")
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                if isinstance(p, Proc):
                    p.kill()  # nothing of theirs outlives the run: no warm shutdown to wait for
                    p.stop()
                else:
                    p.close()
        for _w, broker, _s in workers.values():
            if isinstance(broker, AmqpCounter):
                broker.close()


def bench_broker(name: str, broker: Any, state: RedisServer, counter: RedisServer,
                 policy: Path, args: argparse.Namespace, idle: dict[str, Counts],
                 idle_s: float, rabbit: PrivateRabbit | None = None,
                 rabbit_idle: float = 0.0) -> None:
    meters = [broker, state]
    if name == "redis":
        count, poll = redis_dlq(broker)
        with measuring(broker) as one:
            poll()
        poll_cost = one["broker"]
        broker_url = broker.url()
    else:
        count, poll_cost, broker_url = amqp_dlq(broker), None, broker.url()
    runner = JobRunner(name, broker_url, state, counter, meters, count, poll_cost, policy)
    amqp = name == "amqp"
    unit = "frames" if amqp else "commands"
    print(f"\nper job on a {name} broker: 1 worker (threads, -c {WORKER_CONCURRENCY}), "
          f"{args.jobs} jobs per kind ({args.jobs // 2} failing), the worker's idle rate "
          "taken out. State Redis: commands sent, run in scripts, bytes in/out; broker: "
          + ("AMQP frames client->server, server->client, round trips (a client waits: "
             "confirms and -ok replies), bytes in/out" if amqp else
             "the same as the state Redis"))
    ist, ibr = idle["state"].per(idle_s), idle["broker"].per(idle_s)
    print(f"idle worker over {idle_s:.0f} s, per second: state {ist.client:.1f} sent "
          f"({ist.top(4)}); broker "
          f"{(ibr.total if amqp else ibr.client):.1f} {unit} ({ibr.top(4)})")
    print(f"{'kind':<31}{'sent':>7}{'script':>7}{'B in':>8}{'B out':>8} |"
          + (f"{'c>s':>7}{'s>c':>7}{'RT':>6}" if amqp else f"{'sent':>7}{'script':>7}")
          + f"{'B in':>8}{'B out':>8}{'attempts':>9}")
    tops = []
    messages, first = 0.0, 0.0  # AMQP: publishes + deliveries in all runs; in the first kind's
    rabbit_cpu, began = (rabbit.cpu() if rabbit else 0.0), time.monotonic()
    try:
        for kind in KINDS:
            phase(kind.label)
            n = args.jobs // 2 if kind.fails else args.jobs  # a failing job costs ~4x the time
            per, attempts = runner.run(kind, n, idle, idle_s)
            b = per["broker"]
            print(f"{kind.label:<31}{fmt(per['state'])} |{fmt_amqp(b) if amqp else fmt(b)}"
                  f"{attempts:>9.1f}", flush=True)
            tops.append(f"  {kind.label}: state {per['state'].top(6)}; broker {b.top(8)}")
            handled = b.calls.get("c>basic.publish", 0) + b.calls.get("s>basic.deliver", 0)
            messages += handled * n
            first = first or handled
        if rabbit is not None:
            rabbit_cpu = rabbit.cpu() - rabbit_cpu - rabbit_idle * (time.monotonic() - began)
        cpu = redis_cpu(runner, [m for m in meters if isinstance(m, RedisServer)], args.jobs,
                        idle, idle_s)
    finally:
        runner.close()
    print("all commands per job (commandstats, script calls included):")
    print("\n".join(tops))
    if rabbit is not None and messages > 0:
        per_msg = rabbit_cpu / messages
        print(f"RabbitMQ CPU (a private node, schedulers not busy-waiting), over all the runs: "
              f"{per_msg * 1e6:.0f} us per message published or delivered ({messages:.0f}); a "
              f"successful idempotent job ({first:.1f} messages) {per_msg * first * 1e6:.0f} us: "
              f"one core ~{1 / per_msg:,.0f} messages/s, ~{1 / (per_msg * first):,.0f} jobs/s")
    spent = ", ".join(f"{k} {s * 1e6:.0f} us" for k, s in cpu.items())
    cores = [f"{1 / s:,.0f} jobs/s ({k})" for k, s in cpu.items() if s > 0]
    total = sum(cpu.values())
    if len(cpu) > 1 and total > 0:
        cores.append(f"{1 / total:,.0f} jobs/s (both on one)")
    print(f"Redis CPU per successful idempotent job (MONITOR off): {spent}; one Redis core "
          f"saturates at {', '.join(cores)}")


if __name__ == "__main__":
    main()
