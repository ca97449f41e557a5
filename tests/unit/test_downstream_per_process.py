"""``client_for``: one client per process, so a prefork child never writes on sockets its
parent's pooled connections opened (both processes would then share them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers import downstream
from workers.settings import get_settings

POLICY = Path(__file__).resolve().parents[2] / "workers" / "policy.toml"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_builds_its_own_client(monkeypatch) -> None:
    monkeypatch.setenv("TIDEGATE_POLICY_FILE", str(POLICY))
    get_settings.cache_clear()
    try:
        parent = downstream.client_for("search")
        assert downstream.client_for("search") is parent  # cached in this process
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: answer through the pipe, never return into pytest
            try:
                os.write(write, b"own" if downstream.client_for("search") is not parent
                         else b"shared")
            finally:
                os._exit(0)
        os.close(write)
        answer = os.read(read, 16)
        os.close(read)
        os.waitpid(pid, 0)
        assert answer == b"own"
    finally:
        get_settings.cache_clear()
