"""A Redis master, one replica and three sentinels on free ports, started by
``scripts/services.sh redis-sentinel`` (the script a deployment's own drill uses)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import ROOT, free_port_block

__all__ = ["SentinelGroup", "sentinel_group"]


class SentinelGroup:
    """The group's ports and URLs (master name ``tidegate``; broker db 0, state db 1)."""

    def __init__(self, tmp: Path) -> None:
        base = free_port_block(range(5))
        self.base, self.dir = base, tmp
        self.env = {**os.environ, "REDIS_SENTINEL_DIR": str(tmp),
                    "REDIS_SENTINEL_PORT": str(base), "REDIS_SENTINEL_MASTER": "tidegate"}
        parts = [f"sentinel://127.0.0.1:{base + i}" for i in (2, 3, 4)]
        self.broker_url = f"{parts[0]}/0;{';'.join(parts[1:])}?master_name=tidegate"
        self.state_url = f"{parts[0]}/1;{';'.join(parts[1:])}?master_name=tidegate"

    def services(self, target: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "scripts" / "services.sh"), target], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    def master_port(self) -> int:
        import redis

        s = redis.Redis(port=self.base + 2, socket_timeout=2)
        return int(s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "tidegate")[1])

    def kill(self, port: int) -> None:
        os.kill(int((self.dir / str(port) / "redis.pid").read_text()), signal.SIGKILL)


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server/redis-cli not installed (apt-get install redis-server)")
    group = SentinelGroup(tmp_path / "sentinel")
    out = group.services("redis-sentinel")
    try:
        assert out.returncode == 0, out.stderr
        yield group
    finally:
        group.services("redis-sentinel-stop")  # the pids its own start wrote, nothing else
