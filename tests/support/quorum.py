"""RabbitMQ quorum queues for the tests: a policy file that declares some, and what RabbitMQ
says it declared (``rabbitmqctl list_queues``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path


def quorum_policy(source: Path, path: Path, queues: Iterable[str],
                  queue_type: str = "quorum") -> Path:
    """``source`` (a policy file) copied to ``path`` with ``[queues.Q] queue_type`` for each
    of ``queues``."""
    tables = "".join(f'\n[queues.{q}]\nqueue_type = "{queue_type}"\n' for q in queues)
    path.write_text(source.read_text() + tables)
    return path


def declared(vhost: str, ctl: Sequence[str] = ("rabbitmqctl",)) -> dict[str, dict[str, str]]:
    """queue -> {"type": ..., "arguments": ...} as the broker reports them for ``vhost``."""
    out = subprocess.run([*ctl, "-q", "list_queues", "-p", vhost, "--no-table-headers",
                          "name", "type", "arguments"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    rows = {}
    for line in out.splitlines():
        name, kind, args = [*line.split("\t"), "", ""][:3]
        rows[name] = {"type": kind, "arguments": args}
    return rows
