"""``tidegate policy check [FILE]``: validate a policy file and show what each chain resolves to.

Every number is printed in the file's own units and marked ``file`` (written in the file),
``[section]`` (inherited from a section's defaults) or ``default`` (the seed's value), so a
reader sees at once which figures a team chose and which it inherited.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["policy"]

policy = typer.Typer(no_args_is_help=True, add_completion=False,
                     help="The policy file: check it and show the resolved chains.")

EXIT_INVALID = 2


def _configured() -> Path:
    """The file every command reads (TIDEGATE_POLICY_FILE, else the shipped one), found
    without validating unrelated settings."""
    from workers.settings import DEFAULT_POLICY_FILE

    return Path(os.environ.get("TIDEGATE_POLICY_FILE") or DEFAULT_POLICY_FILE)


def _show(value: Any, scale: float) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value)
    value = value * scale
    return f"{value:g}"


def _adaptive_value(config: Any, attr: str) -> Any:
    """A bulkhead key of ``mode = "adaptive"`` (its numbers live in ``adaptive_limit``)."""
    adaptive = config.adaptive_limit
    if attr == "mode":
        return "static" if adaptive is None else "adaptive"
    return getattr(adaptive, attr, None) if attr in ("min", "max", "initial") else None


def chain_rows(config: Any, table: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(file key, value in file units, origin) for every number of one dependency's chain."""
    from resilience.policy import FILE_KEYS, FILE_SECTIONS

    rows = [(key, _show(getattr(config, attr), scale), "file" if key in table else "default")
            for key, (attr, scale) in FILE_KEYS.items()]
    holders = {"timeout": config, "retry": config.retry_config, "breaker": config.breaker,
               "bulkhead": config.bulkhead, "rate_limit": config.rate_limit,
               "fallback": config.fallback, "hedge": config.hedge}
    for section, keys in FILE_SECTIONS.items():
        written = table.get(section, {})
        holder = holders[section]
        if holder is None:  # rate_limit left out: no limiter at all
            rows.append((section, "off", "default"))
            continue
        for key, (attr, scale) in keys.items():
            value = _adaptive_value(config, attr) if section == "bulkhead" else None
            if value is None:
                value = getattr(holder, attr, None)
            rows.append((f"{section}.{key}", _show(value, scale),
                         "file" if key in written else "default"))
    return rows


def _queue_rows(parsed: Any, queue: str) -> list[tuple[str, str, str]]:
    """Backpressure and autoscaling numbers of one queue, with where each came from."""
    from dataclasses import fields

    from producers.backpressure import FILE_KEYS, BackpressureConfig

    queues = parsed.schema.queues
    written = queues.queues[queue].queue_type if queue in queues.queues else None
    rows = [("queue_type", parsed.topology.queue_type(queue),
             "file" if written else "[queues]" if queues.defaults.queue_type else "default")]
    section = parsed.schema.backpressure
    top = section.defaults.model_dump(exclude_unset=True)
    own = section.queues[queue].model_dump(exclude_unset=True) if queue in section.queues else {}
    seed = BackpressureConfig()
    for key, (attr, scale) in FILE_KEYS.items():
        value = own.get(key, top.get(key))
        origin = "file" if key in own else "[backpressure]" if key in top else "default"
        shown = _show(value, 1) if value is not None else _show(getattr(seed, attr), scale)
        rows.append((f"backpressure.{key}", shown, origin))
    section = parsed.schema.autoscaling
    top = section.defaults.model_dump(exclude_unset=True)
    own = section.queues[queue].model_dump(exclude_unset=True) if queue in section.queues else {}
    resolved = parsed.scaling.get(queue, parsed.scaling_default)
    for f in fields(resolved):
        origin = "file" if f.name in own else "[autoscaling]" if f.name in top else "default"
        rows.append((f"autoscaling.{f.name}", _show(getattr(resolved, f.name), 1), origin))
    section = parsed.schema.shedding
    top = section.defaults.model_dump(exclude_unset=True)
    own = section.queues[queue].model_dump(exclude_unset=True) if queue in section.queues else {}
    rule = parsed.shedding[queue]
    for key, value in (("enabled", rule.enabled), ("max_age_s", rule.max_age_s),
                       ("low", rule.thresholds.low), ("medium", rule.thresholds.medium),
                       ("high", rule.thresholds.high)):
        origin = "file" if key in own else "[shedding]" if key in top else "default"
        shown = "none" if value is None else _show(value, 1)  # no deadline: never shed by age
        rows.append((f"shedding.{key}", shown, origin))
    return rows


def _print(rows: list[tuple[str, str, str]]) -> None:
    for key, value, origin in rows:
        typer.echo(f"    {key:<28} {value:<14} {origin}")


@policy.command()
def check(
    file: Annotated[Path | None, typer.Argument(
        help="Policy file (default: TIDEGATE_POLICY_FILE, else workers/policy.toml)")] = None,
    live: Annotated[bool, typer.Option(
        "--live", help="Also compare each timeout with the P99 the workers observe now "
        "(state Redis): warn below P99 x 2 or above 4 x P99")] = False,
) -> None:
    """Validate a policy file; print each dependency's resolved chain (exit 2 if invalid)."""
    from workers.policy_file import PolicyFileError, load_policy_file

    path = file or _configured()
    try:
        parsed = load_policy_file(path)
    except PolicyFileError as exc:
        for error in exc.errors:
            typer.echo(f"tidegate: error: {path}: {error}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    topology = parsed.topology
    declared = parsed.schema.app.include
    modules = ", ".join(declared) if declared is not None else "not set (the app's own include)"
    typer.echo(f"{path}: valid; {len(topology.dependencies)} dependencies, queues "
               f"{', '.join(topology.work_queues)}; [app] include {modules}")
    for dep in topology.dependencies:
        tasks = ", ".join(dep.tasks) or "none (called from other tasks)"
        typer.echo(f"\n[dependencies.{dep.name}]  queue {dep.queue}  url {dep.url}  "
                   f"tasks {tasks}")
        _print(chain_rows(parsed.configs[dep.name], dict(dep.policy)))
    for queue in topology.work_queues:
        typer.echo(f"\nqueue {queue}")
        _print(_queue_rows(parsed, queue))
    if live:
        _live(parsed)


def _live(parsed: Any) -> None:
    """Each dependency's timeout against the P99 the workers publish (workers.latency_share).
    Warnings only: the file stays valid; an unreachable state Redis is exit 3."""
    from resilience.stores import redis_client
    from workers.latency_share import read_latency, verdict
    from workers.settings import get_settings

    settings = get_settings()
    try:
        observed = read_latency(redis_client(settings.redis_url, socket_timeout=2,
                                             socket_connect_timeout=2))
    except Exception as exc:
        typer.echo(f"tidegate: error: cannot read the observed latency from the state Redis: "
                   f"{type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(3) from None
    typer.echo("\nlive: timeouts against the observed P99 (the seed's rule: P99 x 2)")
    for dep in parsed.topology.dependencies:
        timeout = parsed.configs[dep.name].timeout
        seen = observed.get(dep.name)
        if seen is None:
            typer.echo(f"    {dep.name:<12} timeout {timeout * 1000:g} ms; no samples from "
                       "any worker in the last minute")
            continue
        line = (f"    {dep.name:<12} timeout {timeout * 1000:g} ms; P99 "
                f"{seen.p99_s * 1000:.1f} ms over {seen.samples} attempts, P99 x 2 "
                f"{seen.suggested_timeout_s * 1000:.1f} ms")
        warning = verdict(timeout, seen.p99_s)
        typer.echo(f"{line}: ok" if warning is None else f"{line}")
        if warning is not None:
            typer.echo(f"tidegate: warning: dependencies.{dep.name}.timeout_ms: {warning}",
                       err=True)
