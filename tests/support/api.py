"""The real ``tidegate api`` subprocess for the tests that talk HTTP to it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tidegate.stack import BIN, Proc, free_port, wait_until


@contextmanager
def tidegate_api(env: dict[str, str], log: Path) -> Iterator[tuple[str, Proc]]:
    """``tidegate api`` (uvicorn, as in production) on a free loopback port: its base URL and
    process, once ``/healthz`` answers 200 (a process that died fails at once, with its log).
    Stopped on exit."""
    port = free_port()
    proc = Proc([str(BIN / "tidegate"), "api", "--port", str(port)], env, log, "api")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: not proc.alive() or httpx.get(f"{url}/healthz", timeout=2)
                   .status_code == 200, 60, interval=0.2, message="tidegate api up")
        assert proc.alive(), proc.output()[-3000:]
        yield url, proc
    finally:
        proc.stop()
