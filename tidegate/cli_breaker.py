"""``tidegate breaker list|open|close``: the circuit breakers every worker shares, for operators.

The breakers live in the shared state store (``TIDEGATE_REDIS_URL``), so forcing one here
acts on every worker and producer: each process re-reads an OPEN state at least every
second (``resilience.breaker.OPEN_RECHECK_S``) and picks up a CLOSED one at its next merge.
``open`` is for a dependency you know is down or being maintained; ``close`` is for one you
know is back before its open duration has run out. A forced state is an ordinary state:
the breaker goes on deciding from there.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

__all__ = ["breaker"]

breaker = typer.Typer(no_args_is_help=True,
                      help="Circuit breakers shared by every worker: list, open, close.")

NameArg = Annotated[str, typer.Argument(help="Dependency, e.g. payments")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _store_and_configs() -> tuple[Any, dict[str, Any]]:
    """The shared store (checked reachable: a forced state must not land in a local stand-in)
    and each dependency's breaker config, from the policy file."""
    import redis

    from resilience.errors import TransientError
    from resilience.policy import PolicyConfig
    from resilience.stores import RedisStore, redis_client
    from workers.installation import installation, load_app

    installed = installation(load_app())
    settings, topology = installed.settings, installed.topology
    client = redis_client(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        pool = client.connection_pool  # None on a Redis Cluster
        where = f"{pool.connection_kwargs.get('host')}:{pool.connection_kwargs.get('port')}" \
            if pool is not None else "the Redis Cluster"
        raise TransientError(f"state store unreachable at {where}: {exc}") from None
    configs = {d.name: PolicyConfig.from_mapping(d.name, d.policy).breaker
               for d in topology.dependencies}
    return RedisStore(client), configs


def _config(configs: dict[str, Any], name: str) -> Any:
    from resilience.errors import ConfigError

    if name not in configs:
        raise ConfigError(f"unknown dependency {name!r} (known: {', '.join(sorted(configs))})")
    return configs[name]


def _row(name: str, snap: Any, store: Any) -> dict[str, Any]:
    from resilience.errors import TransientError

    if store.degraded:  # Redis went away after the ping: the answer came from local state
        raise TransientError("state store unreachable: nothing was changed or read")
    return {"dependency": name, "state": snap.state, "retry_after_s": round(snap.retry_after, 3),
            "generation": snap.generation}


def _print(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        wait = f"  (trial calls in {r['retry_after_s']:.1f} s)" if r["state"] == "open" else ""
        typer.echo(f"{r['dependency']:>12}: {r['state']}{wait}")


@breaker.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Every dependency's breaker state, as the workers see it."""
    store, configs = _store_and_configs()
    _print([_row(name, store.breaker_read(name, cfg), store)
            for name, cfg in sorted(configs.items())], as_json)


@breaker.command("open")
def open_(name: NameArg, as_json: JsonOpt = False,
          seconds: Annotated[float | None, typer.Option(
              "--for", min=0.001, help="Seconds to stay open (default: the open duration)")] = None,
          ) -> None:
    """Open NAME's breaker now, for every worker (calls fail fast or fall back)."""
    store, configs = _store_and_configs()
    cfg = _config(configs, name)
    duration = cfg.open_duration if seconds is None else seconds
    _print([_row(name, store.breaker_force(name, cfg, "open", duration), store)], as_json)


@breaker.command("close")
def close(name: NameArg, as_json: JsonOpt = False) -> None:
    """Close NAME's breaker now and forget its window, for every worker."""
    store, configs = _store_and_configs()
    snap = store.breaker_force(name, _config(configs, name), "closed", 0.0)
    _print([_row(name, snap, store)], as_json)
