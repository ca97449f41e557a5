"""``tidegate dlq list|show|replay|purge``: the dead-letter queues, for operators.

``replay`` re-publishes a record's task on its origin queue with the same task id and
idempotency key, clears the task's idempotency mark (so the replay is not taken for a
duplicate) and only then removes the record from the DLQ: an interrupted replay may publish a
task twice (the idempotency mark makes the second a no-op once the first is done), it never
loses a record. A non-idempotent task without an idempotency key may already have had its
effect, so replaying it needs ``--force``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

__all__ = ["dlq"]

dlq = typer.Typer(no_args_is_help=True, help="Dead-letter queues: list, show, replay, purge.")

QueueArg = Annotated[str, typer.Argument(help="Work queue whose DLQ to use, e.g. payments")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _tools() -> Any:
    from workers.deadletter import DeadLetters
    from workers.installation import load_app

    return DeadLetters(load_app())


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@dlq.command("list")
def list_(queue: QueueArg, as_json: JsonOpt = False,
          limit: Annotated[int | None, typer.Option(min=1, help="At most N records")] = None,
          ) -> None:
    """The records in QUEUE's dead-letter queue, oldest first (nothing is removed)."""
    records = _tools().list(queue, limit)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{queue}.dlq: {len(records)} record(s)", title_justify="left")
    for column in ("id", "task", "reason", "attempts", "key", "dead-lettered", "error"):
        table.add_column(column, overflow="fold")
    for r in records:
        error = f"{r.exception_type or ''}: {r.exception_message or ''}".strip(": ")
        table.add_row(r.id[:12], r.task or "?", r.reason, str(r.attempts),
                      r.idempotency_key or "-", _when(r.dead_lettered_at), error[:80])
    Console().print(table)


@dlq.command()
def show(queue: QueueArg, record_id: Annotated[str, typer.Argument(help="Record id or prefix")],
         as_json: JsonOpt = False) -> None:
    """One record in full: arguments, headers, reason, exception and traceback."""
    record = _tools().show(queue, record_id)
    doc = record.to_dict()
    if as_json:
        typer.echo(json.dumps(doc, default=str))
        return
    for key, value in doc.items():
        if key == "traceback" or value in (None, "", [], {}):
            continue
        if key in ("first_seen", "dead_lettered_at"):
            value = _when(value)
        elif isinstance(value, dict | list):
            value = json.dumps(value, default=str)
        typer.echo(f"{key:>18}: {value}")
    if record.needs_force:
        typer.echo(f"{'replay':>18}: needs --force (not idempotent, no idempotency key)")
    if record.traceback:
        typer.echo("\n" + record.traceback.rstrip())


@dlq.command()
def replay(
    queue: QueueArg,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Record id (repeatable)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every replayable record")] = False,
    force: Annotated[bool, typer.Option(
        help="Also replay non-idempotent tasks without an idempotency key")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Publish dead-lettered tasks again on QUEUE, then remove them from its DLQ."""
    from tidegate.cli import fail
    from workers.deadletter import NotReplayable, check_replayable
    from workers.idempotency import IdempotencyStore, StoreUnavailable, mark_key

    if bool(ids) == all_:
        raise fail("give --id ID (one or more) or --all")
    tools = _tools()
    records = tools.list(queue)
    if ids:
        chosen = []
        for wanted in ids:
            found = [r for r in records if r.id.startswith(wanted)]
            if len(found) != 1:
                raise fail(f"{'no' if not found else 'more than one'} record {wanted!r} "
                           f"in {queue}.dlq")
            chosen.append(found[0])
        for r in chosen:  # refuse before doing anything
            check_replayable(r, force=force)
    blocked: list[Any] = []
    if all_:
        # Replay what may be replayed; list what needs --force instead of refusing the batch.
        chosen = [r for r in records if r.replayable]
        if not force:
            blocked = [r for r in chosen if r.needs_force]
            chosen = [r for r in chosen if not r.needs_force]
    skipped = [r for r in records if not r.replayable] if all_ else []
    wanted_ids = {r.id for r in chosen}

    from resilience.stores import redis_client

    settings = tools.settings
    store = IdempotencyStore(redis_client(settings.redis_url, socket_timeout=2.0,
                                          socket_connect_timeout=2.0))

    def handle(record: Any) -> None:
        try:
            store.release(record.task, mark_key(record.idempotency_key, record.task_id))
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"{exc}; nothing replayed for {record.id}") from None
        tools.replay_message(record, force=force)

    replayed: list[dict[str, Any]] = []
    taken = tools.take(queue, lambda r: r.id in wanted_ids, handle)
    if as_json or len(chosen) < 2:
        for record in taken:
            replayed.append({"id": record.id, "task": record.task, "task_id": record.task_id})
    else:
        from rich.progress import Progress

        with Progress(transient=False) as progress:
            bar = progress.add_task(f"replaying {queue}.dlq", total=len(chosen))
            for record in taken:
                replayed.append({"id": record.id, "task": record.task,
                                 "task_id": record.task_id})
                progress.advance(bar)
    missing = wanted_ids - {r["id"] for r in replayed}
    if as_json:
        typer.echo(json.dumps({"replayed": replayed, "skipped": [
            {"id": r.id, "reason": r.reason} for r in skipped], "needs_force": [
            {"id": r.id, "task": r.task, "reason": r.reason} for r in blocked],
            "gone": sorted(missing)}))
    else:
        typer.echo(f"replayed {len(replayed)} record(s) from {queue}.dlq onto {queue}")
        if skipped:
            typer.echo(f"skipped {len(skipped)} poison record(s) (no runnable task); "
                       "see `tidegate dlq show`")
        if missing:
            typer.echo(f"{len(missing)} record(s) left the DLQ meanwhile: {', '.join(missing)}")
        if blocked:
            typer.echo(f"left {len(blocked)} record(s) in {queue}.dlq: non-idempotent tasks "
                       "without an idempotency key, whose effect may already have happened. "
                       "Check the downstream, then replay them with --force:")
            for r in blocked:
                typer.echo(f"  {r.id}  {r.task}  {r.reason}")
    if ids and missing:
        raise typer.Exit(1)
    _ = NotReplayable  # raised above through check_replayable


@dlq.command()
def purge(queue: QueueArg,
          yes: Annotated[bool, typer.Option("--yes", help="Confirm: delete every record")] = False,
          ) -> None:
    """Delete every record in QUEUE's dead-letter queue."""
    from tidegate.cli import fail

    if not yes:
        raise fail(f"purging {queue}.dlq deletes its records for good: add --yes")
    count = _tools().purge(queue)
    typer.echo(f"purged {count} record(s) from {queue}.dlq")
