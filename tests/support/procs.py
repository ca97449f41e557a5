"""The integration tests' processes: re-exported from :mod:`tidegate.stack`."""

from tidegate.stack import (
    BIN,
    ROOT,
    MotoServer,
    Proc,
    Sim,
    Worker,
    free_port,
    free_port_block,
    wait_until,
)

__all__ = ["BIN", "ROOT", "MotoServer", "Proc", "Sim", "Worker", "free_port", "free_port_block",
           "wait_until"]
