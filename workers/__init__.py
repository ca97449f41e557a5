"""The Celery side of Tidegate.

Library mode: ``workers.install(app)`` on your own Celery app (docs/adopting.md). The shipped
example pipeline is ``workers.app`` (``celery -A workers worker -Q payments``), built on first
access: importing this package builds no app and reads no environment.
"""

from __future__ import annotations

import importlib
from typing import Any

# `app` (the example) is left out of __all__: a star import must not build it
__all__ = ["ResilientTask", "create_app", "install", "resilient_task"]

_LAZY = {
    "install": "workers.installation",
    "resilient_task": "workers.resilient",
    "ResilientTask": "workers.resilient",
    "create_app": "workers.application",
}


def __getattr__(name: str) -> Any:
    if name == "app":  # the example app, once per process (what `celery -A workers` finds)
        from workers.application import example_app

        return example_app()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
