"""Which dependencies queue for later, and the SQS store each one writes to.

``sink_for("email")`` is what the worker's queue-for-later fallback and the producer's
"defer an enqueue for an open dependency" both call: the :class:`SqsDeferralStore` of a
dependency whose policy says ``fallback.kind = "queue"``, ``None`` for any other. Built from
settings (endpoint, region, credentials, queue names or URLs), once per process and
settings; it does not touch SQS until the first defer, so a worker starts while SQS is down.
"""

from __future__ import annotations

import os
import threading

from workers.settings import Settings, get_settings, parse_dependency_map
from workers.sqs_deferral import SqsClientConfig, SqsDeferralStore, SqsQueueSpec, sqs_client
from workers.topology import Topology, load_topology

__all__ = ["client_config", "deferred_count", "queue_spec", "queueing_dependencies", "sink_for",
           "store_for"]

_lock = threading.Lock()
_stores: dict[tuple[int, int, str], tuple[Settings, SqsDeferralStore]] = {}
_topologies: dict[int, tuple[Settings, Topology]] = {}


def _topology(settings: Settings) -> Topology:
    """The policy file of ``settings``, parsed once (the settings object is kept alive)."""
    cached = _topologies.get(id(settings))
    if cached is None:
        cached = _topologies[id(settings)] = (settings, load_topology(settings.policy_file))
    return cached[1]


def client_config(settings: Settings) -> SqsClientConfig:
    """The SQS client settings; secrets stay in SecretStr until the client is built."""
    key, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    return SqsClientConfig(
        endpoint_url=settings.sqs_endpoint_url,
        region=settings.sqs_region,
        access_key_id=key.get_secret_value() if key else None,
        secret_access_key=secret.get_secret_value() if secret else None,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        max_attempts=settings.sqs_max_attempts,
    )


def queue_spec(settings: Settings, dependency: str) -> SqsQueueSpec:
    """The dependency's deferral queue and DLQ: from settings if given, else by name."""
    named = SqsQueueSpec.named(dependency, settings.deferral_queue_prefix)
    return SqsQueueSpec(
        dependency,
        parse_dependency_map(settings.deferral_queues).get(dependency, named.queue),
        parse_dependency_map(settings.deferral_dlqs).get(dependency, named.dead_letter_queue),
        max_receive_count=settings.deferral_max_receive_count,
        retention_s=settings.deferral_retention_s,
        near_retention_s=settings.deferral_near_retention_s,
    )


def queueing_dependencies(topology: Topology) -> list[str]:
    """Names of the dependencies whose fallback is queue-for-later."""
    return [d.name for d in topology.dependencies if _fallback_kind(d.policy) == "queue"]


def _fallback_kind(policy: object) -> str | None:
    fallback = policy.get("fallback") if hasattr(policy, "get") else None  # type: ignore[union-attr]
    return fallback.get("kind") if hasattr(fallback, "get") else None  # type: ignore[union-attr]


def store_for(
    dependency: str, settings: Settings | None = None, topology: Topology | None = None
) -> SqsDeferralStore:
    """The SQS store of ``dependency`` (ConfigError if it is unknown), cached per process."""
    settings = settings or get_settings()
    topology = topology or _topology(settings)
    topology.dependency(dependency)  # ConfigError naming the known ones
    key = (os.getpid(), id(settings), dependency)
    with _lock:
        cached = _stores.get(key)
        if cached is None:
            store = SqsDeferralStore(queue_spec(settings, dependency),
                                     sqs_client(client_config(settings)))
            # the settings object is kept alive with its store, so its id is not reused
            cached = _stores[key] = (settings, store)
        return cached[1]


def sink_for(dependency: str, settings: Settings | None = None) -> SqsDeferralStore | None:
    """The deferral sink for ``dependency``, or None if its fallback is not "queue"."""
    settings = settings or get_settings()
    topology = _topology(settings)
    if _fallback_kind(topology.dependency(dependency).policy) != "queue":
        return None
    return store_for(dependency, settings, topology)


def deferred_count(queue: str, settings: Settings | None = None) -> int | None:
    """Deferred entries waiting in SQS for the dependencies that feed work queue ``queue``.

    ``None`` when no dependency of that queue queues for later (the status page shows a dash);
    DeferralError when SQS cannot be asked.
    """
    settings = settings or get_settings()
    topology = _topology(settings)
    names = [n for n in queueing_dependencies(topology) if topology.dependency(n).queue == queue]
    if not names:
        return None
    return sum(store_for(n, settings, topology).stats().total for n in names)
