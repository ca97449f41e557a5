"""``tidegate depth`` (one row per queue, or JSON) and ``tidegate exporter``."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from resilience.errors import TransientError

__all__ = ["depth", "exporter", "register"]

COLUMNS = ("name", "ready", "in_flight", "delayed", "oldest_age_s", "consumers", "dead_letter",
           "deferred", "backlog", "desired_workers", "target_per_worker", "processing_s",
           "live_workers", "orphaned", "source", "error")


class DepthUnreadable(TransientError):
    """No queue's depth could be read: the broker is down or refusing us."""


def _document(snapshot: Any) -> dict[str, Any]:
    doc = snapshot.to_dict()
    return {
        "taken_at": doc["taken_at"],
        "queues": [{k: q[k] for k in COLUMNS} for q in doc["queues"]],
        "breakers": doc["breakers"],
        "latency": doc["latency"],
        "concurrency": doc["concurrency"],
        "errors": doc["errors"],
    }


def _num(value: Any, unit: str = "") -> str:
    if value is None:
        return "[dim]—[/dim]"
    if isinstance(value, float):
        return f"{value:.1f}{unit}" if value >= 10 else f"{value:.2f}{unit}"
    return f"{value}{unit}"


def _table(doc: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"queue depth at {time.strftime('%H:%M:%S')}", title_justify="left")
    for header in ("queue", "ready", "in flight", "dead held", "oldest", "DLQ", "deferred",
                   "consumers", "workers", "desired"):
        table.add_column(header, justify="left" if header == "queue" else "right",
                         no_wrap=True)
    for q in doc["queues"]:
        dlq = _num(q["dead_letter"])
        if q["dead_letter"]:
            dlq = f"[bold red]{dlq}[/bold red]"
        orphaned = _num(q["orphaned"])
        if q["orphaned"]:  # held by dead workers: back on the queue at the next sweep
            orphaned = f"[bold yellow]{orphaned}[/bold yellow]"
        name = q["name"] if not q["error"] else f"{q['name']} [red](unreadable)[/red]"
        table.add_row(name, _num(q["ready"]), _num(q["in_flight"]), orphaned,
                      _num(q["oldest_age_s"], "s"), dlq, _num(q["deferred"]),
                      _num(q["consumers"]), _num(q["live_workers"]),
                      _num(q["desired_workers"]))
    breakers = Table(title="breakers", title_justify="left")
    for header in ("dependency", "queue", "state", "trial in"):
        breakers.add_column(header)
    colour = {"closed": "green", "half_open": "yellow", "open": "bold white on red"}
    for b in doc["breakers"]:
        style = colour.get(b["state"], "dim")
        breakers.add_row(b["dependency"], b["queue"], f"[{style}]{b['state']}[/{style}]",
                         _num(b["retry_after_s"], "s") if b["state"] == "open" else "")
    latency = Table(title="timeouts against observed P99 (P99 x 2 is the seed's rule)",
                    title_justify="left")
    for header in ("dependency", "timeout", "P99", "P99 x 2", "samples", ""):
        latency.add_column(header, justify="left" if header in ("dependency", "") else "right")
    for v in doc.get("latency", []):
        ms = (lambda s: None if s is None else round(s * 1000, 1))  # noqa: E731
        note = f"[yellow]{v['warning']}[/yellow]" if v["warning"] else (
            "[dim]no samples yet[/dim]" if v["p99_s"] is None else "[green]ok[/green]")
        latency.add_row(v["dependency"], _num(ms(v["timeout_s"]), " ms"),
                        _num(ms(v["p99_s"]), " ms"), _num(ms(v["suggested_timeout_s"]), " ms"),
                        _num(v["samples"]), note)
    parts: list[Any] = [table, breakers, latency]
    if doc.get("concurrency"):
        limits = Table(title="adaptive limits (limit and in flight summed over worker "
                             "processes)", title_justify="left")
        for header in ("dependency", "limit", "in flight", "waiting", "baseline",
                       "processes", "per process"):
            limits.add_column(header, justify="left" if header == "dependency" else "right")
        for v in doc["concurrency"]:
            baseline = None if v["baseline_s"] is None else round(v["baseline_s"] * 1000, 1)
            limits.add_row(v["dependency"], _num(v["limit"]), _num(v["in_flight"]),
                           _num(v["waiting"]), _num(baseline, " ms"), _num(v["processes"]),
                           f"{v['min']}..{v['max']}")
        parts.append(limits)
    parts += [f"[yellow]! {e}[/yellow]" for e in doc["errors"]]
    return Group(*parts)


def depth(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one line per reading)")]
    = False,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw until interrupted")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between readings (--watch)")]
    = 2.0,
) -> None:
    """Depth per queue: ready, in flight (and held by dead workers), oldest age, dead-letter,
    deferred, live and desired workers."""
    from tidegate.snapshot import Observer
    from workers.installation import installation, load_app

    installed = installation(load_app())
    observer = Observer(installed.settings, installed.topology,
                        ttl_s=interval / 2 if watch else 0.001)

    def read() -> dict[str, Any]:
        doc = _document(observer.snapshot())
        if doc["queues"] and all(q["error"] for q in doc["queues"]):
            raise DepthUnreadable(f"no queue depth could be read: {doc['queues'][0]['error']}")
        return doc

    if not watch:
        doc = read()
        if as_json:
            typer.echo(json.dumps(doc))
        else:
            from rich.console import Console

            Console().print(_table(doc))
        return
    try:
        if as_json:
            while True:
                typer.echo(json.dumps(read()))
                time.sleep(interval)
        from rich.live import Live

        with Live(_table(read()), auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_table(read()), refresh=True)
    except KeyboardInterrupt:
        return


def exporter(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on")] = 9808,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between samples")] = 1.0,
    ttl: Annotated[float, typer.Option(min=0.05, help="Seconds a reading is reused")] = 1.0,
    history: Annotated[float, typer.Option(min=10, help="Seconds of history on the page")]
    = 600.0,
) -> None:
    """Serve /metrics (Prometheus), the status page (/) and /api/status."""
    from tidegate.exporter import serve

    serve(host, port, interval_s=interval, ttl_s=ttl, history_s=history)


def register(app: typer.Typer) -> None:
    app.command()(depth)
    app.command()(exporter)
