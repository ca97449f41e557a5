"""``tidegate replayer`` and ``tidegate deferred list|replay``: the queue-for-later tools."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Annotated, Any

import typer

from resilience.errors import ConfigError

__all__ = ["deferred", "register", "replayer"]

deferred = typer.Typer(no_args_is_help=True, add_completion=False,
                       help="Requests queued for later in SQS: list them, replay them now.")


def _app() -> Any:
    from workers.installation import load_app

    return load_app()


def _installed(app: Any) -> Any:
    from workers.installation import installation

    return installation(app)


def _queueing(app: Any, dependency: str | None) -> list[str]:
    from workers.deferral import queueing_dependencies

    names = queueing_dependencies(_installed(app).topology)
    if dependency is None:
        if not names:
            raise ConfigError("no dependency in the policy file has fallback kind \"queue\"")
        return names
    _installed(app).topology.dependency(dependency)  # ConfigError naming the known ones
    if dependency not in names:
        raise ConfigError(f"{dependency!r} does not queue for later (its fallback kind is not "
                          f"\"queue\"); these do: {', '.join(names) or 'none'}")
    return [dependency]


def replayer(
    dependency: Annotated[str | None, typer.Option(
        help="Replay this dependency only (default: every one whose fallback is \"queue\")")
    ] = None,
) -> None:
    """Watch dependencies; replay their deferred requests once they are back (until SIGTERM)."""
    from workers.replayer import build_replayer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = _app()
    replayers = [build_replayer(app, name) for name in _queueing(app, dependency)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=r.run, args=(stop,), name=f"replayer-{r.name}",
                                daemon=True) for r in replayers]
    for t in threads:
        t.start()
    while not stop.is_set() and any(t.is_alive() for t in threads):
        stop.wait(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    for r in replayers:
        logging.info("replayer %s stopped: %s", r.name, json.dumps(r.stats.as_dict()))


def _entry_doc(store: Any, entry: Any, now: float) -> dict[str, Any]:
    r = entry.request
    doc: dict[str, Any] = {
        "message_id": entry.message_id,
        "age_s": round(entry.age(now), 1),
        "near_retention": store.near_retention(entry, now),
        "receive_count": entry.receive_count,
        "bytes": entry.body_bytes,
    }
    if r is None:
        doc["error"] = entry.error
        return doc
    doc.update(task=r.task, idempotency_key=r.idempotency_key, priority=r.priority,
               reason=r.reason, first_deferred_at=r.first_deferred_at, deferrals=r.deferrals)
    return doc


@deferred.command("list")
def list_deferred(
    dependency: Annotated[str, typer.Argument(help="Dependency, e.g. email")],
    peek: Annotated[int, typer.Option("--peek", "--limit", min=0, max=100, help=(
        "Also show up to this many entries, oldest first. SQS has no peek: each entry shown "
        "is received and stored again as a fresh copy (new message id), so it never counts "
        "toward the DLQ. Default 0: counts only, from queue attributes, nothing received"))
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Counts of a dependency's deferred requests and its DLQ (no receive unless --peek)."""
    from workers.deferral import store_for
    from workers.deferred_ops import peek as peek_entries

    app = _app()
    _queueing(app, dependency)
    store = store_for(dependency, _installed(app).settings, _installed(app).topology)
    stats = store.stats()
    entries = peek_entries(store, peek) if peek else []
    now = time.time()
    docs = [_entry_doc(store, e, now) for e in entries]
    resolved = store.resolve()
    summary = {
        "dependency": dependency, "queue_url": resolved.url, "dlq_url": resolved.dlq_url,
        "visible": stats.visible, "in_flight": stats.in_flight, "delayed": stats.delayed,
        "dead_letter": stats.dead, "retention_s": resolved.retention_s,
        "max_message_bytes": resolved.max_bytes,
        "max_receive_count": resolved.max_receive_count,
        "near_retention": sum(d["near_retention"] for d in docs), "entries": docs,
        "peeked": bool(peek),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{dependency}[/bold]: {stats.visible} waiting, {stats.in_flight} in "
                  f"flight, {stats.delayed} delayed, {stats.dead} in the DLQ "
                  f"(retention {resolved.retention_s} s, maxReceiveCount "
                  f"{resolved.max_receive_count})")
    if peek:
        console.print(f"peeked {len(docs)} entries: each was received once and stored again "
                      "as a fresh copy (new message id, receive count 0)")
    if summary["near_retention"]:
        console.print(f"[red]{summary['near_retention']} shown entries are near the retention "
                      "period: replay them or SQS drops them[/red]")
    if not docs:
        return
    table = Table("message id", "task", "idempotency key", "age", "receives", "deferrals",
                  "reason")
    for d in docs:
        age = f"[red]{d['age_s']:.0f}s[/red]" if d["near_retention"] else f"{d['age_s']:.0f}s"
        table.add_row(d["message_id"], d.get("task", f"[red]poison: {d.get('error')}[/red]"),
                      d.get("idempotency_key", ""), age, str(d["receive_count"]),
                      str(d.get("deferrals", "")), d.get("reason", ""))
    console.print(table)


@deferred.command("replay")
def replay_deferred(
    dependency: Annotated[str, typer.Argument(help="Dependency, e.g. email")],
) -> None:
    """Drain a dependency's deferred requests now, with the replayer's checks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from workers.replayer import build_replayer

    app = _app()
    _queueing(app, dependency)
    replayer = build_replayer(app, dependency)
    total = replayer.store.stats().total
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[note]}"), transient=False) as bar:
        task = bar.add_task(f"replaying {dependency}", total=total or None, note="")

        def show(stats: Any) -> None:
            bar.update(task, completed=stats.published, total=max(total, stats.published),
                       note=f"poison {stats.poison}" if stats.poison else "")

        stats = replayer.drain(stop, progress=show)
        show(stats)
    typer.echo(json.dumps({"dependency": dependency, **stats.as_dict()}))


@deferred.command("redrive")
def redrive_deferred(
    dependency: Annotated[str, typer.Argument(help="Dependency, e.g. email")],
    limit: Annotated[int | None, typer.Option(min=1, help=(
        "Move at most this many (by receive/send/delete); default: all, with SQS's "
        "StartMessageMoveTask where the endpoint has it"))] = None,
) -> None:
    """Move a dependency's deferred requests from its DLQ back to its deferral queue."""
    from workers.deferral import store_for
    from workers.deferred_ops import redrive

    app = _app()
    _queueing(app, dependency)
    store = store_for(dependency, _installed(app).settings, _installed(app).topology)
    result = redrive(store, limit)
    logging.getLogger("tidegate.deferred").info(
        "%s: redrive moved %d deferred requests from the DLQ (%s)", dependency, result.moved,
        result.method)
    typer.echo(json.dumps({"dependency": dependency, **result.as_dict()}))


def register(app: typer.Typer) -> None:
    app.command()(replayer)
    app.add_typer(deferred, name="deferred")
