"""``tidegate exporter`` as a real subprocess, and helpers to read what it serves."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import BIN, Proc, free_port, wait_until

AUTOSCALING = """
[autoscaling]
acceptable_wait_s = 2
worker_concurrency = 1
default_processing_s = 1
min_workers = 0
max_workers = 4
scale_down_window_s = 0
"""


def policy_with_autoscaling(policy_file: Path, tmp: Path, extra: str = AUTOSCALING) -> Path:
    """The test policy file with its own [autoscaling] table, small enough to see workers move
    (the shipped per-queue autoscaling tables are dropped so they cannot override it)."""
    path = tmp / "policy-autoscaling.toml"
    shipped = re.sub(r"^\[autoscaling[^\]]*\]\n(?:[a-z_]+ = [^\n]*\n)*", "",
                     policy_file.read_text(), flags=re.M)
    path.write_text(shipped + extra)
    return path


ADAPTIVE_SEARCH = ('[dependencies.search.bulkhead]\nmode = "adaptive"\nmin = 2\nmax = 20\n'
                   'initial = 6\nmax_wait_ms = 200\n')


def with_adaptive_search(policy_file: Path, tmp: Path) -> Path:
    """The policy file with search's static bulkhead replaced by an adaptive limit."""
    text, n = re.subn(r"\[dependencies\.search\.bulkhead\]\nmax_concurrent = \d+\n",
                      ADAPTIVE_SEARCH, policy_file.read_text())
    if n != 1:
        raise RuntimeError("search's bulkhead table not found in the policy file")
    path = tmp / f"adaptive-{policy_file.name}"
    path.write_text(text)
    return path


class Exporter(Proc):
    def __init__(self, env: Mapping[str, str], tmp: Path, *, interval: float = 0.5,
                 ttl: float = 0.2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([str(BIN / "tidegate"), "exporter", "--port", str(self.port),
                          "--interval", str(interval), "--ttl", str(ttl)], env,
                         tmp / f"exporter-{self.port}.log", "exporter")
        # idle connections dropped before the exporter's 5 s keep-alive ends (workers.downstream)
        self.http = httpx.Client(base_url=self.url, timeout=10.0,
                                 limits=httpx.Limits(keepalive_expiry=1.0))
        wait_until(lambda: not self.alive() or self.http.get("/healthz").status_code == 200,
                   60, interval=0.1, message=f"exporter on {self.url}")
        if not self.alive():
            raise AssertionError(f"exporter died at start:\n{self.output()[-3000:]}")

    def metrics_text(self) -> str:
        response = self.http.get("/metrics")
        response.raise_for_status()
        return response.text

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``{(sample name, sorted labels): value}`` from one scrape, parsed as Prometheus."""
        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self, timeout: float = 10.0) -> None:
        self.http.close()
        super().stop(timeout)


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
