"""Queue-for-later at the producer: while a dependency's circuit is OPEN, store the job in
its deferral store (SQS) instead of adding it to a queue whose workers can only fail it.

Only dependencies whose policy fallback kind is ``"queue"`` defer. The breaker is the one the
workers trip, read through the shared Redis store; the store comes from
``workers.deferral.sink_for`` (imported lazily: it is optional). If storing fails, the job is
published to its queue as usual, where the worker-side fallback still applies: nothing is lost.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from typing import Any

from resilience.breaker import BreakerState, CircuitBreaker
from resilience.errors import DeferralError
from resilience.fallback import DeferralSink, DeferredRequest
from resilience.policy import PolicyConfig
from resilience.shedding import Priority
from resilience.stores import RedisStore
from workers.settings import Settings
from workers.topology import Topology

__all__ = ["DeferralGate"]

log = logging.getLogger(__name__)


def _workers_sink(settings: Settings) -> Callable[[str], DeferralSink | None]:
    def sink_for(dependency: str) -> DeferralSink | None:
        try:
            from workers.deferral import sink_for as workers_sink_for
        except ImportError:
            return None
        return workers_sink_for(dependency, settings)

    return sink_for


class DeferralGate:
    """Decides, per task, whether to defer it now; holds one breaker per deferring dependency."""

    def __init__(
        self,
        topology: Topology,
        breakers: Mapping[str, CircuitBreaker],
        sink_for: Callable[[str], DeferralSink | None],
    ) -> None:
        self.topology = topology
        self.breakers = dict(breakers)
        self._sink_for = sink_for
        self._sinks: dict[str, DeferralSink | None] = {}

    @classmethod
    def from_settings(cls, settings: Settings, topology: Topology,
                      client: Any) -> DeferralGate | None:
        """A gate over the dependencies whose fallback is "queue" (None if there are none)."""
        store = RedisStore(client, name="producer")
        breakers = {}
        for dep in topology.dependencies:
            config = PolicyConfig.from_mapping(dep.name, dep.policy)
            if config.fallback.kind == "queue" and dep.tasks:
                breakers[dep.name] = CircuitBreaker(dep.name, config.breaker, store)
        return cls(topology, breakers, _workers_sink(settings)) if breakers else None

    def dependency_for(self, task: str) -> str | None:
        for dep in self.topology.dependencies:
            if any(fnmatch.fnmatchcase(task, pattern) for pattern in dep.tasks):
                return dep.name
        return None

    def _sink(self, dependency: str) -> DeferralSink | None:
        if dependency not in self._sinks:
            try:
                self._sinks[dependency] = self._sink_for(dependency)
            except Exception as exc:  # misconfigured store: publish instead, say why
                log.warning("no deferral store for %s: %s", dependency, exc)
                return None
        return self._sinks[dependency]

    def maybe_defer(self, task: str, args: list[Any], kwargs: dict[str, Any],
                    priority: Priority, idempotency_key: str | None,
                    states: dict[str, BreakerState] | None = None) -> str | None:
        """The deferred request's id if the job was stored for later, else None (publish it).

        ``states`` memoises breaker states across the jobs of one batch (one read each)."""
        dependency = self.dependency_for(task)
        breaker = self.breakers.get(dependency or "")
        if breaker is None:
            return None
        if states is None:
            state = breaker.state
        elif (state := states.get(breaker.name)) is None:
            state = states[breaker.name] = breaker.state
        if state is not BreakerState.OPEN:
            return None
        sink = self._sink(dependency)  # type: ignore[arg-type]
        if sink is None:
            return None
        request = DeferredRequest(dependency, task, tuple(args), dict(kwargs), idempotency_key,
                                  int(priority), reason="circuit_open")
        try:
            return sink.defer(request)
        except DeferralError as exc:
            log.warning("deferring %s failed, publishing it instead: %s", task, exc)
            return None
