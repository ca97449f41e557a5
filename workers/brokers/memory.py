"""kombu's in-memory transport (``memory://``): one process, for tests and trying things out.

Everything is kombu's default; no worker liveness threads (nothing outlives the process).
"""

from __future__ import annotations

from workers.brokers.base import BrokerAdapter

__all__ = ["MemoryBroker"]


class MemoryBroker(BrokerAdapter):
    name = "memory"
    schemes = ("memory",)
    runs_liveness = False
