"""``tidegate deploy keda``: deployment manifests generated from the policy file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tidegate.keda import BROKERS, Endpoints, render
from workers.settings import DEFAULT_POLICY_FILE

__all__ = ["deploy"]

deploy = typer.Typer(no_args_is_help=True, help="Manifests generated from the policy file.")
_DEFAULTS = Endpoints()


@deploy.command()
def keda(
    broker: Annotated[str, typer.Option(help=f"Variant: {', '.join(BROKERS)}")],
    policy: Annotated[Path, typer.Option(envvar="TIDEGATE_POLICY_FILE",
                                         help="Policy file (default: the shipped one)")]
    = DEFAULT_POLICY_FILE,
    redis_address: Annotated[str, typer.Option(help="Redis broker host:port")]
    = _DEFAULTS.redis_address,
    redis_db: Annotated[int, typer.Option(min=0, help="Redis broker db")] = _DEFAULTS.redis_db,
    rabbitmq_vhost: Annotated[str, typer.Option(help="RabbitMQ vhost")]
    = _DEFAULTS.rabbitmq_vhost,
    sqs_queue_url_prefix: Annotated[str, typer.Option(help="SQS queue URL up to the name")]
    = _DEFAULTS.sqs_queue_url_prefix,
    sqs_region: Annotated[str, typer.Option(help="SQS region")] = _DEFAULTS.sqs_region,
    prometheus_url: Annotated[str, typer.Option(help="Prometheus server address")]
    = _DEFAULTS.prometheus_url,
) -> None:
    """Print KEDA ScaledObjects for every work queue (apply one variant only)."""
    if broker not in BROKERS:
        typer.echo(f"tidegate: error: --broker must be one of {', '.join(BROKERS)}, "
                   f"got {broker!r}", err=True)
        raise typer.Exit(2)
    ends = Endpoints(redis_address, redis_db, rabbitmq_vhost, sqs_queue_url_prefix, sqs_region,
                     prometheus_url)
    typer.echo(render(broker, policy, ends), nl=False)
