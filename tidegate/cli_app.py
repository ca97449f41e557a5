"""``--app/-A``: which Celery app the ``tidegate`` commands work on, named the way ``celery -A``
names one (``myproj.celery:app``, or a module holding ``app``). Without it, ``TIDEGATE_APP``;
without that, the shipped example (``workers:app``).

The option goes before the command (``tidegate -A shop depth``) or on it (``tidegate enqueue
--app shop ...``). It is passed on as ``TIDEGATE_APP`` so that everything this process starts
(``tidegate api --workers 4`` spawns uvicorn workers) resolves the same app.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer

__all__ = ["AppOpt", "add_app_option", "use_app"]

AppOpt = Annotated[str | None, typer.Option(
    "--app", "-A", metavar="MODULE[:ATTR]",
    help="The Celery app, as for celery -A (default: $TIDEGATE_APP, else the example)")]


def use_app(spec: str | None) -> None:
    """Make ``spec`` the app :func:`workers.installation.load_app` resolves in this process."""
    if spec:
        os.environ["TIDEGATE_APP"] = spec


def _with_app(fn: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(fn, eval_str=True)  # the command's own Annotated options
    extra = inspect.Parameter("celery_app", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=AppOpt)

    @functools.wraps(fn)
    def command(*args: Any, celery_app: str | None = None, **kwargs: Any) -> Any:
        use_app(celery_app)
        return fn(*args, **kwargs)

    command.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*sig.parameters.values(), extra])
    return command


def add_app_option(cli: typer.Typer, *, skip: Iterable[str] = ()) -> None:
    """Give every command of ``cli`` (sub-groups included) an ``--app/-A`` option."""
    skipped = set(skip)
    for info in cli.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else "")
        if info.callback is not None and name not in skipped:
            info.callback = _with_app(info.callback)
    for group in cli.registered_groups:
        if group.typer_instance is not None and group.name not in skipped:
            add_app_option(group.typer_instance)
