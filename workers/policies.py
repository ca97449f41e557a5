"""The per-dependency chains of a worker process, built once from the topology.

One :class:`~resilience.policy.PolicyRegistry` per process, its breakers, limiters and retry
budgets shared through Redis (``TIDEGATE_REDIS_URL``) so every worker sees the same circuit.
The chains are built *without* their fallback: a resilient task decides which fallback may
stand in for which step (a stale price may stand in for a read, never a default for a charge),
so the fallbacks are kept beside the chains (:func:`fallback_for`).

Built lazily and per process id, so a prefork child never uses its parent's sockets.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from celery import signals

from resilience.fallback import CachedValue, DefaultValue, Fallback, Graceful, QueueForLater
from resilience.policy import Policy, PolicyConfig, PolicyRegistry
from resilience.stores import RedisCache, RedisStore, redis_client
from workers.idempotency import IdempotencyStore, ttl_from_env
from workers.installation import installation
from workers.jobs import JobStatuses
from workers.redis_line import ReplyLater
from workers.settings import Settings
from workers.shedding import QueueShedder, ShedRule
from workers.topology import Topology

log = logging.getLogger(__name__)

STATE_TIMEOUT_S = 0.5  # Redis state calls are on every task's path: never wait long


@dataclass
class WorkerState:
    """Everything a worker process shares between its tasks."""

    registry: PolicyRegistry
    configs: dict[str, PolicyConfig]
    fallbacks: dict[str, Fallback | None]
    idempotency: IdempotencyStore
    pid: int
    jobs: JobStatuses | None = None  # job status for GET /v1/jobs/{id} (workers.jobs)
    shedders: dict[str, QueueShedder] = field(default_factory=dict)  # per work queue

    def policy(self, dependency: str) -> Policy:
        return self.registry.policy(dependency)

    def fallback_for(self, dependency: str) -> Fallback | None:
        return self.fallbacks.get(dependency)


_lock = threading.Lock()
_state: dict[tuple[int, int], WorkerState] = {}


def _deferral_sink(dependency: str) -> Any:
    """The queue-for-later sink, if ``workers.deferral`` (the SQS store) is installed."""
    try:
        from workers.deferral import sink_for  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return sink_for(dependency)
    except Exception as exc:  # a broken sink must not stop the worker: the fallback is off
        log.warning("no queue-for-later sink for %s: %s", dependency, exc)
        return None


def _fallback(config: PolicyConfig, cache: RedisCache) -> Fallback | None:
    spec = config.fallback
    if spec.kind == "cached":
        return CachedValue(cache, spec.ttl)
    if spec.kind == "default":
        return DefaultValue(spec.value)
    if spec.kind == "graceful":
        return Graceful(spec.message, spec.unknown_message)
    if spec.kind == "queue":
        sink = _deferral_sink(config.name)
        return QueueForLater(sink, spec.max_deferrals) if sink is not None else None
    return None


def build_state(settings: Settings, topology: Topology) -> WorkerState:
    client = redis_client(settings.redis_url, socket_timeout=STATE_TIMEOUT_S,
                          socket_connect_timeout=STATE_TIMEOUT_S)
    store = RedisStore(client)
    cache = RedisCache(client)
    configs = {d.name: PolicyConfig.from_mapping(d.name, d.policy) for d in topology.dependencies}
    # Fallback() never serves: the chain raises and the task picks the fallback per step.
    policies = {name: Policy(cfg, store=store, fallback=Fallback())
                for name, cfg in configs.items()}
    registry = PolicyRegistry(policies, store=store)
    fallbacks = {name: _fallback(cfg, cache) for name, cfg in configs.items()}
    idem_client = redis_client(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    # A cluster has no single connection to write marks on unanswered: they wait (SET).
    replies = ReplyLater(idem_client) if idem_client.connection_pool is not None else None
    idem = IdempotencyStore(idem_client, ttl_from_env(), replies=replies)
    # job states ride the marks' line: a socket write each, no round trip
    jobs = JobStatuses(idem_client, ttl_from_env(), replies=replies)
    return WorkerState(registry, configs, fallbacks, idem, os.getpid(), jobs,
                       _shedders(settings, topology))


def _shedders(settings: Settings, topology: Topology) -> dict[str, QueueShedder]:
    """One shedder per work queue, from the policy file's ``[shedding]`` (workers.shedding)."""
    from workers.policy_file import load_policy_file

    try:
        rules = load_policy_file(settings.policy_file).shedding
    except Exception as exc:  # an app installed with a topology of its own and no file
        log.warning("no [shedding] rules read (%s); the defaults apply", exc)
        rules = {}
    return {q: QueueShedder(q, rules.get(q) or ShedRule()) for q in topology.work_queues}


def close_states(**_: Any) -> None:
    """Read the replies still owed to this process's done marks (they were all sent already;
    this only reports the ones Redis refused). At exit, and when a prefork child stops."""
    for (_, pid), state in list(_state.items()):
        if pid == os.getpid():
            state.idempotency.close()


atexit.register(close_states)
signals.worker_process_shutdown.connect(close_states, weak=False)


def existing_state(app: Any) -> WorkerState | None:
    """This process's state for ``app`` if a task has built it, else None (never builds)."""
    return _state.get((id(app), os.getpid()))


def state_for(app: Any) -> WorkerState:
    """This process's state for ``app`` (built on first use)."""
    key = (id(app), os.getpid())
    state = _state.get(key)
    if state is None:
        with _lock:
            state = _state.get(key)
            if state is None:
                installed = installation(app)
                state = _state[key] = build_state(installed.settings, installed.topology)
    return state
