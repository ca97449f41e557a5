"""A local stack of real processes: downstream simulators, Celery workers, a moto server.

Used by the integration tests, the benchmarks and ``make demo``. Everything binds to
127.0.0.1 on a free port, waits for readiness with bounded polling and is stopped (SIGTERM,
then SIGKILL) when done.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]  # the checkout (an editable install)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(offsets: Iterable[int]) -> int:
    """A base port with ``base + offset`` free for every offset: for services that take a run
    of ports from one base (a Redis Cluster's nodes and buses, a sentinel group)."""
    offsets = list(offsets)
    for _ in range(200):
        base = free_port()
        if base + max(offsets) < 65536 and all(_is_free(base + o) for o in offsets):
            return base
    raise RuntimeError(f"no free block of ports at offsets {offsets}")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with ``message`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def ensure_vhost(name: str, ctl: Sequence[str] = ("rabbitmqctl",), user: str = "guest",
                 timeout: float = 60.0) -> None:
    """Create the RabbitMQ vhost ``name`` with full permissions for ``user`` unless it exists:
    tests and benches each keep their queues in a vhost of their own on the shared broker.

    ``ctl`` is the rabbitmqctl command line to use (a private node or cluster passes its own,
    with ``-n <node>`` and its cookie's environment).
    """
    listed = subprocess.run([*ctl, "-q", "list_vhosts"], capture_output=True, text=True,
                            timeout=timeout)
    if listed.returncode != 0:
        raise RuntimeError(f"rabbitmqctl list_vhosts failed ({listed.returncode}): "
                           f"{(listed.stderr or listed.stdout).strip()[:500]}")
    if name in listed.stdout.split():
        return
    for args in (("add_vhost", name), ("set_permissions", "-p", name, user, ".*", ".*", ".*")):
        subprocess.run([*ctl, "-q", *args], check=True, timeout=timeout)


class Proc:
    """A child process with its output in a log file, stopped for sure at teardown."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path, name: str,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=cwd, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a prefork worker's children too)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(timeout)
        else:
            self.popen.wait()
        self._log.close()


class Sim:
    """A running ``tidegate downstream`` simulator and its control/ledger API."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc([str(BIN / "tidegate"), "downstream", "--name", name, "--port",
                          str(self.port)], {}, tmp / f"sim-{name}.log", f"sim-{name}")
        # idle connections dropped after 1 s, well before uvicorn's 5 s (httpx keeps them
        # 5 s): a call on one the simulator is closing would be reset (see workers.downstream)
        self.http = httpx.Client(base_url=self.url, timeout=5.0,
                                 limits=httpx.Limits(keepalive_expiry=1.0))
        wait_until(lambda: self.http.get("/control").status_code == 200, 30,
                   message=f"simulator {name} on {self.url}")

    def control(self, **settings: Any) -> dict[str, Any]:
        response = self.http.post("/control", json=settings)
        response.raise_for_status()
        return response.json()

    def ledger(self) -> dict[str, Any]:
        return self.http.get("/ledger").json()

    def in_progress(self) -> list[str]:
        """Idempotency keys whose first request the simulator is serving right now."""
        return self.http.get("/in-progress").json()["in_progress"]

    def reset(self) -> None:
        self.http.post("/reset").raise_for_status()

    def stop(self) -> None:
        self.http.close()
        self.proc.stop()


class Worker(Proc):
    """``celery -A <app> worker -Q <queues>`` as a real subprocess (the example app unless
    ``app`` names another, found from ``cwd``)."""

    def __init__(self, queues: str, env: Mapping[str, str], tmp: Path, *, pool: str = "threads",
                 concurrency: int = 2, extra: tuple[str, ...] = (), app: str = "workers",
                 cwd: Path = ROOT) -> None:
        self.node = f"{queues.replace(',', '-')}-{uuid.uuid4().hex[:6]}@127.0.0.1"
        argv = [str(BIN / "celery"), "-A", app, "worker", "-Q", queues, "-n", self.node,
                "-P", pool, "-c", str(concurrency), "--loglevel", "INFO", "--without-gossip",
                "--without-mingle", "--without-heartbeat", *extra]
        super().__init__(argv, env, tmp / f"worker-{self.node.split('@')[0]}.log", self.node,
                         cwd)

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        wait_until(lambda: not self.alive() or " ready." in self.output(), timeout,
                   interval=0.1, message=f"worker {self.node} ready")
        if not self.alive():
            raise AssertionError(f"worker {self.node} died at start:\n{self.output()[-3000:]}")
        return self


class MotoServer(Proc):
    """A moto server (SQS-compatible endpoint) on a free loopback port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                         {}, tmp / "moto.log", "moto")
        wait_until(lambda: httpx.get(f"{self.url}/moto-api/", timeout=2).status_code < 500, 60,
                   message=f"moto server on {self.url}")


def write_policy(sims: Mapping[str, Sim], path: Path,
                 source: Path = ROOT / "workers" / "policy.toml") -> Path:
    """Copy the policy file to ``path`` with each dependency's URL pointing at its simulator."""
    text = source.read_text()
    for name, sim in sims.items():
        text = re.sub(rf'(\[dependencies\.{name}\][^\[]*?url = )"[^"]*"', rf'\1"{sim.url}"',
                      text, flags=re.S)
    urls = {n: t["url"] for n, t in tomllib.loads(text)["dependencies"].items() if n in sims}
    if urls != {n: s.url for n, s in sims.items()}:
        raise RuntimeError(f"policy rewrite missed a dependency: {urls}")
    path.write_text(text)
    return path
