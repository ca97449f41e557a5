"""Start-up errors of a ``celery`` command as one line, not a Celery traceback.

Two mistakes stop a worker before it does anything, and Celery reports both as a traceback
with the cause on its last line: a bad setting or policy file (a
:class:`~resilience.errors.ConfigError` while ``celery -A`` loads the app) and a ``-Q`` queue
the app does not declare. Here the first is printed as ``celery: error: ...`` and exits 2 when
(and only when) the ``celery`` command is loading the app, and a ``celeryd_init`` receiver
checks ``-Q``/``-X`` against the app's queues before the worker selects them. Everywhere else
(a library import, a test) a ConfigError is raised as usual.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from celery import signals

from resilience.errors import ConfigError, did_you_mean

__all__ = ["EXIT_BAD_CONFIG", "exit_on_config_error", "under_celery_command"]

EXIT_BAD_CONFIG = 2
F = TypeVar("F", bound=Callable[..., Any])


def under_celery_command() -> bool:
    """True while the ``celery`` command line is running (it is a click program; its context
    is current while it loads ``-A`` and runs a sub-command)."""
    try:
        import click
    except ImportError:  # pragma: no cover - celery depends on click
        return False
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.find_root().command.name == "celery"


def _stop(message: str) -> None:
    print(f"celery: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_CONFIG)  # not an Exception: Celery's loaders do not wrap it


def exit_on_config_error(fn: F) -> F:
    """Decorate what builds or installs an app: under the ``celery`` command a ConfigError
    becomes one line and exit 2; elsewhere it is raised unchanged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            if under_celery_command():
                _stop(str(exc))
            raise

    return wrapper  # type: ignore[return-value]


def _queue_names(value: Any) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(q).strip() for q in items if str(q).strip()]


def check_worker_queues(sender: Any = None, instance: Any = None, options: Any = None,
                        **_: Any) -> None:
    """``celeryd_init``: every ``-Q``/``-X`` queue must be one the app declares."""
    app = getattr(instance, "app", None)
    if app is None or app.conf.task_create_missing_queues:
        return
    declared = list(app.amqp.queues)
    for flag, key in (("-Q", "queues"), ("-X", "exclude_queues")):
        for queue in _queue_names((options or {}).get(key)):
            if queue not in declared:
                _stop(f"worker {flag} {queue}: unknown queue{did_you_mean(queue, declared)} "
                      "(queues come from the policy file's [dependencies.*] tables; "
                      "`tidegate policy check` lists them)")


signals.celeryd_init.connect(check_worker_queues, weak=False, dispatch_uid="tidegate-queues")
