"""The ``tidegate`` command. Each sub-command imports what it needs only when it runs, so
``tidegate --help`` is fast and a broken broker URL cannot stop ``tidegate downstream``.

Errors that Tidegate raises on purpose print as one line and exit non-zero (2 for bad input,
3 for an unavailable broker or store); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
import typer.main

from resilience.errors import (
    ConfigError,
    DeferralError,
    PermanentError,
    TidegateError,
    TransientError,
)
from tidegate import cli_deferred, cli_depth
from tidegate.cli_app import AppOpt, add_app_option, use_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Tidegate: resilient Celery pipelines (enqueue, workers' tools, simulators).",
)

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"tidegate: error: {message}", err=True)
    return typer.Exit(code)


def parse_json(option: str, text: str, kind: type) -> Any:
    """Parse a JSON option, naming the option when it is malformed or of the wrong shape."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{option} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, kind):
        raise fail(f"{option} must be a JSON {'array' if kind is list else 'object'}")
    return value


@app.command()
def enqueue(
    task: Annotated[str, typer.Argument(help="Task name, e.g. payments.charge")],
    args: Annotated[str, typer.Option(help="Positional arguments as a JSON array")] = "[]",
    kwargs: Annotated[str, typer.Option(help="Keyword arguments as a JSON object")] = "{}",
    priority: Annotated[str, typer.Option(help="critical, high, medium or low")] = "high",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Makes the task safe to retry")
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Override the routed queue")] = None,
    deadline_ms: Annotated[int | None, typer.Option(help="Total budget for the job")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Enqueue one task through the Producer (the same checks as the HTTP API)."""
    parsed_args = parse_json("--args", args, list)
    parsed_kwargs = parse_json("--kwargs", kwargs, dict)
    # A one-shot command reports a refusal in its own one line; the producer's warnings
    # (e.g. "depth unavailable, admitting without throttle") belong in a service's log.
    logging.getLogger("producers").setLevel(logging.ERROR)
    from producers import Producer

    result = Producer().enqueue(
        task, parsed_args, parsed_kwargs, priority=priority, idempotency_key=idempotency_key,
        queue=queue, deadline_s=deadline_ms / 1000 if deadline_ms else None,
    )
    if as_json:
        typer.echo(json.dumps({"id": result.id, "state": result.state, "queue": result.queue,
                               "task": result.task, "priority": result.priority.name.lower(),
                               "idempotency_key": result.idempotency_key}))
    else:
        typer.echo(f"{result.state} {result.id} on {result.queue} ({result.priority.name})")


@app.command()
def downstream(
    name: Annotated[str, typer.Option(help="Dependency this simulator plays")] = "downstream",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8101,
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
) -> None:
    """Run a downstream simulator (switch behaviour with POST /control, read GET /ledger)."""
    from tidegate.downstream import serve

    serve(name, host, port)


@app.command()
def feed(
    rate: Annotated[float, typer.Option(min=0.01, help="Jobs per second")] = 2.0,
    count: Annotated[int | None, typer.Option(help="Stop after this many jobs")] = None,
) -> None:
    """Enqueue a steady stream of mixed example jobs (what `make run` shows working)."""
    from tidegate.feed import run

    run(rate, count)


cli_depth.register(app)  # depth, exporter
cli_deferred.register(app)  # replayer, deferred list|replay
app.add_typer(__import__("tidegate.cli_dlq").cli_dlq.dlq, name="dlq")  # dead-letter queues
app.add_typer(__import__("tidegate.cli_breaker").cli_breaker.breaker, name="breaker")  # breakers
app.add_typer(__import__("tidegate.cli_policy").cli_policy.policy, name="policy")  # policy check
app.command(name="api")(__import__("tidegate.cli_api").cli_api.api)  # HTTP service
app.command(name="demo")(__import__("tidegate.demo.cli").demo.cli.demo)  # the storm demo
app.command(name="migrate")(__import__("tidegate.cli_migrate").cli_migrate.migrate)  # old layout
app.command(name="job")(__import__("tidegate.cli_job").cli_job.job)  # one job's status
app.add_typer(__import__("tidegate.cli_deploy").cli_deploy.deploy, name="deploy")  # KEDA files
# --app/-A on each command that works on a Celery app
add_app_option(app, skip={"downstream", "feed", "demo", "deploy", "migrate", "job"})


@app.callback()
def _root(celery_app: AppOpt = None) -> None:
    use_app(celery_app)


# Typer >= 0.29 vendors click (typer._click); older releases raise click's own classes. Both
# are found through a class typer exports, so neither import path is hard-wired.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def usage_error(exc: Exception) -> int:
    """Print a click/typer error as one line on stderr; return its exit code (2 for usage)."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "tidegate"
    message = exc.format_message()  # type: ignore[attr-defined]
    commands = getattr(ctx.command, "commands", None) if ctx is not None else None
    if commands and message.startswith("Missing command"):
        message = f"missing command: one of {', '.join(sorted(commands))}"
    hint = f" (see '{where} --help')" if isinstance(exc, _USAGE_ERROR) else ""
    typer.echo(f"{where}: error: {_one_line(message)}{hint}", err=True)
    return EXIT_BAD_INPUT if isinstance(exc, _USAGE_ERROR) else getattr(exc, "exit_code", 1)


def _missing_command_is_an_error(group: Any) -> None:
    """A group called without a command answers "missing command" in one line instead of
    its help page (``no_args_is_help`` prints the page through rich, outside any handler)."""
    group.no_args_is_help = False
    for sub in getattr(group, "commands", {}).values():
        if hasattr(sub, "commands"):
            _missing_command_is_an_error(sub)


def command() -> Any:
    """The click command of :data:`app`, every group of it included, as :func:`main` runs it."""
    root = typer.main.get_command(app)
    _missing_command_is_an_error(root)
    return root


def _runtime_error(exc: TidegateError) -> int:
    """Tidegate's own errors: one line, the README's exit code."""
    typer.echo(f"tidegate: error: {exc}", err=True)
    if isinstance(exc, ConfigError | PermanentError):
        return EXIT_BAD_INPUT
    if isinstance(exc, TransientError | DeferralError):  # broker, state store, SQS unavailable
        return EXIT_UNAVAILABLE
    return 1


def main() -> None:
    """Entry point: usage errors and Tidegate's own errors become one line (exit 2 for bad
    input, 3 for an unavailable broker or store); anything else is a bug and keeps its
    traceback."""
    from workers.logs import quiet_per_request_logs

    quiet_per_request_logs()  # per-request client lines at WARNING (see workers/logs.py)
    try:
        code = command().main(standalone_mode=False)  # the exit code of a typer.Exit
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except TidegateError as exc:
        sys.exit(_runtime_error(exc))
    except _CLICK_ERROR as exc:
        sys.exit(usage_error(exc))


if __name__ == "__main__":
    main()
