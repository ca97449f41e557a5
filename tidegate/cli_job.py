"""``tidegate job ID``: what became of a job (``workers.jobs``; the same as GET /v1/jobs/{id})."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from resilience.errors import PermanentError


class UnknownJob(PermanentError):
    """No status for that id: never seen, or older than the TTL (exit 2)."""


def job(
    job_id: Annotated[str, typer.Argument(help="The id POST /v1/jobs or enqueue returned")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON")] = False,
) -> None:
    """Show a job's latest state: queued, running, retrying, succeeded, failed, dead_lettered
    (with its reason), deferred or replayed."""
    import redis

    from resilience.stores import redis_client
    from workers.errors import BrokerUnavailable
    from workers.idempotency import ttl_from_env
    from workers.jobs import JobStatuses
    from workers.settings import get_settings

    settings = get_settings()
    client = redis_client(settings.redis_url, socket_timeout=settings.read_timeout_s,
                          socket_connect_timeout=settings.connect_timeout_s)
    jobs = JobStatuses(client, ttl_from_env())
    try:
        doc = jobs.read(job_id)
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"state store unreachable: {exc}") from None
    if doc is None:
        raise UnknownJob(f"no job {job_id!r} (never seen, or older than "
                         f"{jobs.ttl_ms // 1000} s)")
    if as_json:
        typer.echo(json.dumps(doc))
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["at"]))
    detail = {k: v for k, v in doc.items() if k not in ("id", "state", "at", "task", "queue",
                                                        "replay")}
    extra = " ".join(f"{k}={v}" for k, v in detail.items())
    typer.echo(f"{doc['state']} {doc.get('task') or '-'} on {doc.get('queue') or '-'} since "
               f"{when}{' ' + extra if extra else ''}")
    if doc.get("replay"):
        typer.echo(f"  replay {doc['replay_id']}: {doc['replay']['state']}")
