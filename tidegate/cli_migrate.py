"""``tidegate migrate``: a Redis broker written by an older Tidegate, moved to kombu's layout.

See ``workers.redis_layout`` and docs/delivery.md ("Redis wire format"). Imports what it
needs only when it runs (importing ``workers`` reads the settings).
"""

from __future__ import annotations

from typing import Annotated

import typer


def migrate(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, change nothing")] = False,
) -> None:
    """Move messages from old "q:3/6/9" lists and rewrite old bindings (Redis brokers)."""
    import redis

    from resilience.errors import ConfigError
    from workers.brokers import broker_for
    from workers.brokers.redis import RedisBroker
    from workers.errors import BrokerUnavailable
    from workers.redis_layout import migrate as run
    from workers.settings import get_settings
    from workers.topology import load_topology

    settings = get_settings()
    broker = broker_for(settings)
    if not isinstance(broker, RedisBroker):  # a Redis layout is all this command knows
        raise ConfigError(f"nothing to migrate: the broker is {broker.name}, not Redis")
    topology = load_topology(settings.policy_file)
    queues = [*topology.work_queues, *(topology.dead_letter_queue(q)
                                       for q in topology.work_queues)]
    client = broker.client(settings)
    try:
        report = run(client, queues, dry_run=dry_run)
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"broker unreachable: {exc}") from None
    verb = "would move" if dry_run else "moved"
    for old, count in sorted(report.moved.items()):
        typer.echo(f"{verb} {count} messages from {old!r}")
    for binding in report.bindings_dropped:
        typer.echo(f"{'would drop' if dry_run else 'dropped'} unreadable binding {binding}")
    if report.bindings_rewritten:
        typer.echo(f"{'would rewrite' if dry_run else 'rewrote'} "
                   f"{report.bindings_rewritten} bindings")
    if not report.changed:
        typer.echo("nothing to migrate: the broker already uses kombu's layout")
