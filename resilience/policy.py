"""The chain for one dependency, built from the policy file, applied as a call or decorator.

Outermost first, as :data:`DEFAULT_LAYERS` lists them (the one place the order lives; see
docs/architecture.md)::

    RateLimit > Shedding > Fallback > Deadline > Retry > Hedge > Breaker > Bulkhead | AdaptiveLimit
        > Timeout > call

Each entry builds one layer of :mod:`resilience.layers` from the policy (or nothing, when the
policy has no rate limit, shedder or fallback); :class:`~resilience.chain.Chain` nests them.
``Policy(config, layers=(...))`` runs a subset in any order; :class:`~resilience.chain.Chain`
composes any layers, a user's own included.

Policy file: one ``[dependencies.NAME]`` table per dependency (see :meth:`PolicyConfig.
from_mapping` in :mod:`resilience.policy_config`); absent values take the seed's defaults.

Sync attempts are bounded cooperatively by default (``timeout.mode = "cooperative"``): the
attempt runs inline, its budget is published to :func:`resilience.deadline.client_timeout`,
and a result that comes back after the attempt timeout is an ``AttemptTimeout``. A dependency
whose client code does not take its timeouts from the budget sets ``timeout.mode =
"abandon"``: its attempts run in the bulkhead's pool and are abandoned on timeout. See
:mod:`resilience.timeout` and ``docs/resilience.md`` for why the default is cooperative.

There is one execution path. What keeps it lean: the breaker layer counts a success locally
while the breaker is plainly CLOSED, attempt durations go to :class:`~resilience.callstats.
CallStats` in one append (folded in bulk into the histogram, the success counter, the latency
window and the retry budget), the deadline is published to the callee once per call, and
tenacity is entered only once the first attempt has failed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from .adaptive import AdaptiveLimiter
from .breaker import CircuitBreaker
from .bulkhead import Bulkhead
from .callstats import CallStats
from .chain import Chain, Layer, new_call
from .clock import SYSTEM_CLOCK, Clock
from .errors import ConfigError, RejectedError, TransientError, did_you_mean
from .events import EVENTS, CallFinished, EventBus
from .fallback import DeferralSink, Fallback
from .hedge import HedgeDelay
from .latency import LatencyRecorder
from .layers import (
    AdaptiveLimitLayer,
    BreakerLayer,
    BulkheadLayer,
    DeadlineLayer,
    FallbackLayer,
    HedgeLayer,
    RateLimitLayer,
    RetryLayer,
    SheddingLayer,
    TimeoutLayer,
)
from .policy_config import FILE_KEYS, FILE_SECTIONS, FallbackSpec, PolicyConfig, build_fallback
from .ratelimit import RateLimiter
from .retry import InCallPause, Retrier, RetryBudget
from .shedding import LoadShedder, Priority
from .stores import Cache, MemoryStore, StateStore
from .timeout import COOPERATIVE, Timeout

__all__ = [
    "DEFAULT_LAYERS",
    "FILE_KEYS",
    "FILE_SECTIONS",
    "FallbackSpec",
    "Policy",
    "PolicyConfig",
    "PolicyRegistry",
    "build_fallback",
    "build_policies",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

def _rate_limit(p: Policy) -> Layer | None:
    return RateLimitLayer(p.rate_limiter) if p.rate_limiter is not None else None


def _shedding(p: Policy) -> Layer | None:
    return SheddingLayer(p.shedder) if p.shedder is not None else None


def _fallback(p: Policy) -> Layer | None:
    if p.fallback is None:
        return None
    return FallbackLayer(p.fallback, dependency=p.name, events=p.events,
                         on=(TransientError, *p.config.retry_config.retry_on))


def _deadline_layer(p: Policy) -> Layer:
    return DeadlineLayer(p.config.deadline, p.clock)


def _retry(p: Policy) -> Layer:
    return RetryLayer(p.retrier, idempotent=p.config.idempotent, stats=p.stats, events=p.events)


def _hedge(p: Policy) -> Layer | None:
    h = p.config.hedge
    if h is None:
        return None
    a = p.config.adaptive_limit
    slots = a.max if a is not None else p.config.bulkhead.max_concurrent
    return HedgeLayer(p.name, h, p.retry_budget, pool_size=slots * (h.max + 1), clock=p.clock,
                      events=p.events, delay=p.hedge_delay)


def _breaker(p: Policy) -> Layer:
    return BreakerLayer(p.breaker, p.stats)


def _bulkhead(p: Policy) -> Layer | None:
    # an abandoning timeout runs attempts in the bulkhead's pool, which holds the slot until
    # the work really ends: a second slot here would count every attempt twice
    if p.adaptive_limiter is not None:  # the adaptive limit replaces the static one
        return None
    return BulkheadLayer(p.bulkhead) if p.timeout.mode == COOPERATIVE else None


def _adaptive_limit(p: Policy) -> Layer | None:
    return AdaptiveLimitLayer(p.adaptive_limiter) if p.adaptive_limiter is not None else None


def _timeout(p: Policy) -> Layer:
    return TimeoutLayer(p.timeout)


LayerFactory = Callable[["Policy"], "Layer | None"]

DEFAULT_LAYERS: Mapping[str, LayerFactory] = MappingProxyType({
    "rate_limit": _rate_limit,
    "shedding": _shedding,
    "fallback": _fallback,
    "deadline": _deadline_layer,
    "retry": _retry,
    "hedge": _hedge,
    "breaker": _breaker,
    "bulkhead": _bulkhead,
    "adaptive_limit": _adaptive_limit,
    "timeout": _timeout,
})
"""The chain's layers, outermost first: the one list of what a policy runs and in what order.
Each factory builds its layer from the policy, or returns None when the policy has nothing
for it (no rate limit configured, no shedder, no fallback). Adding a layer is adding a line
here (and its module in :mod:`resilience.layers`); ``Policy(..., layers=("retry",
"breaker"))`` runs a subset, in the order given."""


class Policy:
    """One dependency's chain. Thread-safe; ``call`` for sync, ``acall`` for asyncio.

    ``layers`` picks and orders the layers by their names in :data:`DEFAULT_LAYERS` (default:
    all of them, in that order). Its pattern objects (``breaker``, ``bulkhead``, ``timeout``,
    ``retrier``, ``rate_limiter``, ``fallback``) are attributes whether or not their layer runs.
    """

    def __init__(
        self,
        config: PolicyConfig,
        *,
        store: StateStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        cache: Cache | None = None,
        deferral_sink: DeferralSink | None = None,
        fallback: Fallback | None = None,
        shedder: LoadShedder | None = None,
        retry_budget: RetryBudget | None = None,
        rng: Any = random,
        events: EventBus = EVENTS,
        layers: Iterable[str] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.events = events
        self.clock = clock
        self.store: StateStore = store if store is not None else MemoryStore(clock)
        self.breaker = CircuitBreaker(self.name, config.breaker, self.store, clock,
                                      events=events)
        self.bulkhead = Bulkhead(self.name, config.bulkhead, events=events)
        self.adaptive_limiter = (
            AdaptiveLimiter(self.name, config.adaptive_limit, clock=clock, events=events)
            if config.adaptive_limit is not None else None)
        self.timeout = Timeout(config.timeout, self.bulkhead, clock, mode=config.timeout_mode)
        self.retry_budget = retry_budget or RetryBudget(
            name=self.name, store=self.store, clock=clock
        )
        # in the call the short scale: retries fit the deadline; the seed's seconds-long
        # schedule is for work that goes back to the queue (workers' countdowns)
        retry = config.retry_config
        self.retrier = Retrier(
            retry, name=self.name, budget=self.retry_budget, clock=clock, rng=rng,
            events=events, wait=InCallPause(retry.pause, config.timeout, rng),
            attempt_timeout=config.timeout, attempts=retry.per_call,
        )
        self.rate_limiter = (
            RateLimiter(self.name, config.rate_limit, self.store, clock, events=events)
            if config.rate_limit
            else None
        )
        self.shedder = shedder
        self.fallback = (
            fallback
            if fallback is not None
            else build_fallback(
                config.fallback, dependency=self.name, cache=cache, deferral_sink=deferral_sink,
                events=events,
            )
        )
        # hedge.delay = "p95": the delay follows the latency window, refreshed as it folds
        self.hedge_delay = (HedgeDelay(config.hedge, dependency=self.name, events=events)
                            if config.hedge is not None else None)
        latency = LatencyRecorder()
        on_successes: list[Callable[[int], Any]] = [self.retry_budget.record_request]
        if self.hedge_delay is not None and self.hedge_delay.q is not None:
            on_successes.append(self.hedge_delay.follower(latency, clock.now))
        # a first-attempt success is one append here; folded into these in bulk
        self.stats = CallStats(
            self.name,
            on_successes=on_successes,
            latency=latency,
            now=clock.now,
            events=events,
        )
        if layers is None:  # the policy file's order, else the default one
            layers = config.layers if config.layers is not None else DEFAULT_LAYERS
        names = tuple(layers)
        for n in names:
            if n not in DEFAULT_LAYERS:
                raise ConfigError(f"{self.name}: unknown layer {n!r}"
                                  f"{did_you_mean(n, DEFAULT_LAYERS)}")
        built = (DEFAULT_LAYERS[n](self) for n in names)
        self.chain = Chain(layer for layer in built if layer is not None)
        self._run = self.chain.run
        self._arun = self.chain.arun

    def follow_p99(self, p99_s: float) -> float | None:
        """For ``timeout_ms = "p99x2"``: set the per-attempt timeout to P99 x 2 within the
        configured floor and ceiling (never infinite, never below the floor); returns it.
        None (nothing changed) for a fixed timeout. Workers call it with the P99 shared by
        every process (:mod:`workers.latency_share`)."""
        cfg = self.config
        if not cfg.adaptive_timeout or not p99_s > 0:
            return None
        seconds = min(max(p99_s * 2, cfg.timeout_floor), cfg.timeout_ceiling)
        self.timeout.seconds = seconds  # read once per attempt: a float swap, no lock
        return seconds

    @property
    def latency(self) -> LatencyRecorder:
        """Attempt durations of the last calls (``suggested_timeout()``: P99 x 2)."""
        self.stats.fold()
        return self.stats.latency

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, Exception):
            self.events.emit(CallFinished(
                self.name, "rejected" if isinstance(error, RejectedError) else "failure"))

    def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        idempotency_key: str | None = None,
        priority: Priority | str | int = Priority.HIGH,
        client: str | None = None,
        **kwargs: Any,
    ) -> T | Any:
        """Run ``fn(*args, **kwargs)`` through the chain. ``client`` keys the rate limit."""
        prio = priority if type(priority) is Priority else Priority.parse(priority)
        try:  # the call as the chain carries it (resilience.chain.new_call)
            return self._run((fn, args, kwargs, idempotency_key, prio, client, 1, None))
        except BaseException as error:
            self._failed(error)
            raise

    async def acall(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        idempotency_key: str | None = None,
        priority: Priority | str | int = Priority.HIGH,
        client: str | None = None,
        **kwargs: Any,
    ) -> T | Any:
        """Await ``fn(*args, **kwargs)`` through the chain."""
        prio = Priority.parse(priority)
        try:
            return await self._arun(new_call(fn, args, kwargs, idempotency_key, prio, client))
        except BaseException as error:
            self._failed(error)
            raise

    # -- decorator
    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``@policy.guard``: every call of ``fn`` runs through the chain (sync or async)."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def aguarded(*args: Any, **kwargs: Any) -> Any:
                return await self.acall(fn, *args, **kwargs)

            return aguarded

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return self.call(fn, *args, **kwargs)

        return guarded

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, breaker={self.breaker.state.value}, chain={self.chain!r})"


def build_policies(
    tables: Mapping[str, Mapping[str, Any]],
    store: StateStore | None = None,
    deferral_sink: DeferralSink | None = None,
    cache: Cache | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    shedder: LoadShedder | None = None,
) -> dict[str, Policy]:
    """One :class:`Policy` per ``[dependencies.NAME]`` table, sharing one store."""
    store = store if store is not None else MemoryStore(clock)
    return {
        name: Policy(
            PolicyConfig.from_mapping(name, table),
            store=store,
            clock=clock,
            cache=cache,
            deferral_sink=deferral_sink,
            shedder=shedder,
        )
        for name, table in tables.items()
    }


class PolicyRegistry:
    """One place to get the policy (and breaker) of a dependency by name.

    An unknown name is a ConfigError (with the close name meant): a misspelled dependency
    must not quietly run on the seed's defaults. :meth:`add` registers one explicitly
    (``registry.add(PolicyConfig(name="x"))`` for the seed's defaults).
    """

    def __init__(
        self,
        policies: Mapping[str, Policy] | None = None,
        *,
        store: StateStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        deferral_sink: DeferralSink | None = None,
        cache: Cache | None = None,
    ) -> None:
        self._policies: dict[str, Policy] = dict(policies or {})
        self.store = store if store is not None else MemoryStore(clock)
        self.clock = clock
        self.deferral_sink = deferral_sink
        self.cache = cache
        self._lock = threading.Lock()

    @classmethod
    def from_tables(
        cls,
        tables: Mapping[str, Mapping[str, Any]],
        store: StateStore | None = None,
        deferral_sink: DeferralSink | None = None,
        cache: Cache | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> PolicyRegistry:
        store = store if store is not None else MemoryStore(clock)
        policies = build_policies(tables, store, deferral_sink, cache, clock=clock)
        return cls(policies, store=store, clock=clock, deferral_sink=deferral_sink, cache=cache)

    def policy(self, name: str) -> Policy:
        p = self._policies.get(name)
        if p is None:
            raise ConfigError(f"unknown dependency {name!r}{did_you_mean(name, self._policies)}")
        return p

    def add(self, config: PolicyConfig) -> Policy:
        """Register ``config``'s dependency (once: a second add of a name is refused)."""
        with self._lock:
            if config.name in self._policies:
                raise ConfigError(f"dependency {config.name!r} is already registered")
            p = self._policies[config.name] = Policy(
                config,
                store=self.store,
                clock=self.clock,
                deferral_sink=self.deferral_sink,
                cache=self.cache,
            )
            return p

    __getitem__ = policy

    def breaker(self, name: str) -> CircuitBreaker:
        return self.policy(name).breaker

    def names(self) -> list[str]:
        return sorted(self._policies)

    def __contains__(self, name: object) -> bool:
        return name in self._policies

    def __iter__(self):
        return iter(self.names())
