"""Every usage error of every ``tidegate`` command is one line on stderr and exit 2.

The commands are enumerated from the typer app as ``tidegate`` runs it, so a command added
later is walked too: each group without a command and with an unknown one; each command with
an unknown option, an unexpected extra argument, its required arguments missing, and every
numeric option given ``abc``. Each case runs the real console script; none of them may get as
far as running the command.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import types
import typing
from typing import Any

import pytest

from tests.support.procs import BIN, free_port
from tidegate.cli import command

pytestmark = pytest.mark.integration


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tidegate"), *argv], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def _base(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _types(cmd: Any) -> dict[str, Any]:
    """Each parameter's Python type, from the function typer wraps (any typer version)."""
    hints = typing.get_type_hints(inspect.unwrap(cmd.callback))
    return {name: _base(hint) for name, hint in hints.items()}


def _value(kind: Any) -> str:
    return "1" if kind in (int, float) else "x"


def cases() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = [("unknown option", ["--no-such-option"])]

    def walk(cmd: Any, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs is not None:
            found.append(("missing command", path))
            found.append(("unknown command", [*path, "no-such-command"]))
            for name, sub in subs.items():
                walk(sub, [*path, name])
            return
        kinds = _types(cmd)
        arguments = [p for p in cmd.params if p.param_type_name == "argument"]
        options = [p for p in cmd.params if p.param_type_name == "option"]
        variadic = any(p.nargs != 1 for p in arguments)  # takes any number: no "extra"
        required = [p for p in cmd.params if p.required]
        fill = [_value(kinds.get(p.name)) for p in arguments if p.required]
        for p in options:
            if p.required:
                fill += [p.opts[0], _value(kinds.get(p.name))]
        found.append(("unknown option", [*path, "--no-such-option"]))
        if not variadic:
            all_args = [_value(kinds.get(p.name)) for p in arguments]
            found.append(("extra argument", [*path, *all_args, *fill[len(all_args):],
                                             "unexpected-extra"]))
        if required:
            found.append(("missing argument", path))
        for p in options:
            if not getattr(p, "is_flag", False) and kinds.get(p.name) in (int, float):
                found.append(("malformed value", [*path, *fill, p.opts[0], "abc"]))

    walk(command(), [])
    return found


CASES = cases()


def test_every_command_is_walked():
    walked = {" ".join(argv[:-1]) for kind, argv in CASES if kind == "unknown option"}
    assert {"", "enqueue", "dlq list", "breaker open", "policy check", "deferred list"} <= walked
    assert ["breaker", "open", "x", "--for", "abc"] in [argv for _, argv in CASES]
    assert len(CASES) > 60


@pytest.mark.parametrize(("kind", "argv"), CASES, ids=[f"{k}: {' '.join(a)}" for k, a in CASES])
def test_usage_error_is_one_line_and_exit_2(kind: str, argv: list[str]):
    # Nothing should connect anywhere; if a case ever ran its command, it would fail fast here.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    out = run(*argv, env={"TIDEGATE_BROKER_URL": dead, "TIDEGATE_REDIS_URL": dead})
    assert out.returncode == 2, (kind, argv, out)
    assert out.stdout == "", out.stdout
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("tidegate"), out.stderr
    assert ": error: " in out.stderr and "Traceback" not in out.stderr


def test_help_still_works():
    out = run("dlq", "--help")
    assert out.returncode == 0 and "list" in out.stdout and out.stderr == ""
