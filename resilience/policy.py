"""The chain for one dependency, built from the policy file, applied as a call or decorator.

Outermost first (docs/architecture.md)::

    RateLimiter > LoadShedder > Fallback > Deadline > Retry > CircuitBreaker > Bulkhead
    > Timeout > call

Policy file: one ``[dependencies.NAME]`` table per dependency (see :meth:`PolicyConfig.
from_mapping`); absent values take the seed's defaults.

Sync attempts are bounded cooperatively by default (``timeout.mode = "cooperative"``): the
attempt runs inline, its budget is published to :func:`resilience.deadline.client_timeout`,
and a result that comes back after the attempt timeout is an ``AttemptTimeout``. A dependency
whose client code does not take its timeouts from the budget sets ``timeout.mode =
"abandon"``: its attempts run in the bulkhead's pool and are abandoned on timeout. See
:mod:`resilience.timeout` and ``docs/resilience.md`` for why the default is cooperative.

The success path is kept lean, because every guarded call pays it. While the breaker is
CLOSED with no merge due and a bulkhead slot is free, a cooperative call runs as one flat
sequence: a clock read, a slot token, one context-variable scope for the attempt's budget, the
call, a second clock read, one breaker count, and one append to :class:`~resilience.callstats.
CallStats` (which feeds the histogram, the success counter, the latency window and the retry
budget in bulk). Anything else - a failure, a late or slow result, an open or half-open
breaker, a full bulkhead, the abandon mode - takes the full path, layer by layer, with
tenacity entered only once the first attempt has failed. Both paths make the same decisions;
``tests/unit/test_resilience_policy.py`` runs them side by side.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from . import deadline as _deadline
from .breaker import BreakerConfig, CircuitBreaker, Permit
from .bulkhead import Bulkhead, BulkheadConfig
from .callstats import CallStats
from .clock import SYSTEM_CLOCK, Clock
from .errors import (
    AttemptTimeout,
    ConfigError,
    LateResult,
    PermanentError,
    RejectedError,
    TransientError,
    did_you_mean,
)
from .events import EVENTS, CallFinished, EventBus, FallbackServed
from .fallback import (
    CachedValue,
    CallContext,
    DefaultValue,
    DeferralSink,
    Fallback,
    Graceful,
    NoFallback,
    QueueForLater,
)
from .latency import LatencyRecorder
from .ratelimit import RateLimitConfig, RateLimiter
from .retry import Retrier, RetryBudget, RetryConfig
from .shedding import LoadShedder, Priority
from .stores import Cache, MemoryCache, MemoryStore, StateStore
from .timeout import DEFAULT_TIMEOUT_MODE, Timeout, check_timeout, check_timeout_mode

__all__ = [
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

FALLBACK_KINDS = ("none", "cached", "default", "graceful", "queue")
LEAD_KEYS = frozenset({"queue", "url", "tasks"})  # read by workers/, ignored here


# The policy file's keys -> (PolicyConfig or section attribute, divisor to seconds): a
# dependency's top-level numbers, then its sub-tables. ``timeout`` holds flat fields.
FILE_KEYS: Mapping[str, tuple[str, float]] = MappingProxyType({
    "idempotent": ("idempotent", 1),
    "timeout_ms": ("timeout", 1000),
    "deadline_ms": ("deadline", 1000),
})
FILE_SECTIONS: Mapping[str, Mapping[str, tuple[str, float]]] = MappingProxyType({
    "timeout": {"mode": ("timeout_mode", 1)},  # ``timeout.mode = "abandon"``
    "retry": {
        "max_attempts": ("max_attempts", 1),
        "base_s": ("base", 1),
        "max_wait_s": ("max_wait", 1),
    },
    "breaker": {
        "failure_rate": ("failure_rate", 1),
        "window_s": ("window", 1),
        "minimum_calls": ("minimum_calls", 1),
        "open_s": ("open_duration", 1),
        "half_open_calls": ("half_open_calls", 1),
        "slow_call_ms": ("slow_call_duration", 1000),
        "slow_call_rate": ("slow_call_rate", 1),
    },
    "bulkhead": {
        "max_concurrent": ("max_concurrent", 1),
        "max_wait_ms": ("max_wait", 1000),
    },
    "rate_limit": {"rate_per_s": ("rate", 1), "burst": ("burst", 1)},
    "fallback": {
        "kind": ("kind", 1),
        "ttl_s": ("ttl", 1),
        "value": ("value", 1),
        "message": ("message", 1),
        "max_deferrals": ("max_deferrals", 1),
    },
})

@dataclass(frozen=True)
class FallbackSpec:
    kind: str = "none"
    ttl: float = 300.0  # cached: how stale an answer may be served
    value: Any = None  # default: the value returned
    message: str | None = None  # graceful: what users read
    max_deferrals: int = 5  # queue: a request deferred this often is not deferred again

    def __post_init__(self) -> None:
        if self.kind not in FALLBACK_KINDS:
            raise ConfigError(
                f"fallback kind must be one of {', '.join(FALLBACK_KINDS)}, got {self.kind!r}"
            )
        check_timeout(self.ttl, "fallback ttl_s")
        if not (isinstance(self.max_deferrals, int) and not isinstance(self.max_deferrals, bool)
                and self.max_deferrals >= 1):
            raise ConfigError(
                f"fallback max_deferrals must be an integer >= 1, got {self.max_deferrals!r}")


@dataclass(frozen=True)
class PolicyConfig:
    """One dependency's policy. Seed defaults: 80 ms per attempt, 200 ms in total.

    ``retry=None`` means the seed's schedule. A non-idempotent dependency may not declare a
    retry (ConfigError): its calls retry only when they carry an idempotency key.
    ``timeout_mode`` is how sync attempts are bounded: ``"cooperative"`` (inline, the callee's
    clients follow the budget, a late result is a timeout; the default) or ``"abandon"``
    (in the bulkhead's pool, abandoned on timeout). See :mod:`resilience.timeout`.
    """

    name: str = "default"
    timeout: float = 0.08
    deadline: float = 0.2
    idempotent: bool = False
    retry: RetryConfig | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    bulkhead: BulkheadConfig = field(default_factory=BulkheadConfig)
    rate_limit: RateLimitConfig | None = None
    fallback: FallbackSpec = field(default_factory=FallbackSpec)
    timeout_mode: str = DEFAULT_TIMEOUT_MODE

    def __post_init__(self) -> None:
        check_timeout(self.timeout, f"{self.name}: timeout")
        check_timeout_mode(self.timeout_mode, f"{self.name}: timeout mode")
        check_timeout(self.deadline, f"{self.name}: deadline")
        if self.timeout > self.deadline:
            raise ConfigError(
                f"{self.name}: per-attempt timeout {self.timeout}s exceeds the deadline "
                f"{self.deadline}s"
            )
        if not isinstance(self.idempotent, bool):
            raise ConfigError(f"{self.name}: idempotent must be true or false")
        if not self.idempotent and self.retry is not None and self.retry.max_attempts > 1:
            raise ConfigError(
                f"{self.name}: not idempotent, so it may not declare a retry; calls carrying "
                "an idempotency key retry with the default schedule (or set idempotent = true)"
            )

    @property
    def retry_config(self) -> RetryConfig:
        return self.retry or RetryConfig()

    @classmethod
    def from_mapping(cls, name: str, table: Mapping[str, Any]) -> PolicyConfig:
        """Parse one ``[dependencies.NAME]`` table; unknown keys are a ConfigError."""
        where = f"dependencies.{name}"
        table = dict(table)
        for k in LEAD_KEYS:
            table.pop(k, None)
        kw: dict[str, Any] = {"name": name}
        top, sections = FILE_KEYS, FILE_SECTIONS
        builders = {
            "retry": RetryConfig,
            "breaker": BreakerConfig,
            "bulkhead": BulkheadConfig,
            "rate_limit": RateLimitConfig,
            "fallback": FallbackSpec,
        }

        def convert(path: str, value: Any, scale: float) -> Any:
            if scale == 1:
                return value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{path} must be a number, got {value!r}")
            return value / scale

        for key, value in table.items():
            path = f"{where}.{key}"
            if key in top:
                attr, scale = top[key]
                kw[attr] = convert(path, value, scale)
            elif key in sections:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{path} must be a table")
                known = sections[key]
                args: dict[str, Any] = {}
                for sub, subval in value.items():
                    if sub not in known:
                        raise ConfigError(
                            f"unknown key {path}.{sub} (expected one of {', '.join(known)})"
                        )
                    attr, scale = known[sub]
                    args[attr] = convert(f"{path}.{sub}", subval, scale)
                if key == "timeout":  # flat fields of PolicyConfig, not a nested config
                    if "timeout_mode" in args:
                        check_timeout_mode(args["timeout_mode"], f"{path}.mode")
                    kw.update(args)
                    continue
                try:
                    kw[key] = builders[key](**args)
                except TypeError as exc:  # e.g. rate_limit without rate_per_s
                    raise ConfigError(f"{path}: {exc}") from None
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
            else:
                raise ConfigError(
                    f"unknown key {path} (expected one of {', '.join([*top, *sections])})"
                )
        return cls(**kw)


def build_fallback(
    spec: FallbackSpec,
    *,
    dependency: str,
    cache: Cache | None = None,
    deferral_sink: DeferralSink | None = None,
    events: EventBus = EVENTS,
) -> Fallback | None:
    """The strategy a spec names. A queue fallback without a sink is refused (never lose it)."""
    if spec.kind == "none":
        return None
    if spec.kind == "cached":
        return CachedValue(cache if cache is not None else MemoryCache(), spec.ttl)
    if spec.kind == "default":
        return DefaultValue(spec.value)
    if spec.kind == "graceful":
        return Graceful(spec.message)
    if deferral_sink is None:
        raise ConfigError(f"{dependency}: fallback kind 'queue' needs a deferral sink")
    return QueueForLater(deferral_sink, spec.max_deferrals, events=events)


def _task_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "name", None)  # Celery tasks carry their registered name
    if isinstance(name, str):
        return name
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class Policy:
    """One dependency's chain. Thread-safe; ``call`` for sync, ``acall`` for asyncio."""

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
    ) -> None:
        self.config = config
        self.name = config.name
        self.events = events
        self.clock = clock
        self.store: StateStore = store if store is not None else MemoryStore(clock)
        self.breaker = CircuitBreaker(self.name, config.breaker, self.store, clock,
                                      events=events)
        self.bulkhead = Bulkhead(self.name, config.bulkhead, events=events)
        self.timeout = Timeout(config.timeout, self.bulkhead, clock, mode=config.timeout_mode)
        self.retry_budget = retry_budget or RetryBudget(
            name=self.name, store=self.store, clock=clock
        )
        self.retrier = Retrier(
            config.retry_config, name=self.name, budget=self.retry_budget, clock=clock, rng=rng,
            events=events,
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
        self._fallback_on = (TransientError, *config.retry_config.retry_on)
        # a first-attempt success is one append here; folded into these in bulk
        self.stats = CallStats(
            self.name,
            on_successes=(self.retry_budget.record_request,),
            latency=LatencyRecorder(),
            now=clock.now,
            events=events,
        )
        self._admits = self.rate_limiter is not None or self.shedder is not None
        # the success path reads these once per call: plain attributes and bound methods
        self._deadline_s = config.deadline
        self._timeout_s = config.timeout
        self._slow_s = config.breaker.slow_call_duration or math.inf
        self._now = time.monotonic if clock is SYSTEM_CLOCK else clock.now
        self._inline = self.timeout.mode == "cooperative"
        self._closed_generation = self.breaker.closed_generation
        self._count_breaker_success = self.breaker.count_success
        self._take_slot = self.bulkhead.try_take
        self._release_slot = self.bulkhead.release
        self._record_first_success = self.stats.success

    def _count(self, outcome: str) -> None:
        self.events.emit(CallFinished(self.name, outcome))

    @property
    def latency(self) -> LatencyRecorder:
        """Attempt durations of the last calls (``suggested_timeout()``: P99 x 2)."""
        self.stats.fold()
        return self.stats.latency

    # -- layers shared by sync and async
    def _admit(self, priority: Priority, client: str | None) -> None:
        try:
            if self.rate_limiter is not None:
                self.rate_limiter.acquire(client or "-")
            if self.shedder is not None:
                self.shedder.admit(priority)
        except RejectedError:
            self._count("rejected")
            raise

    def _retryable(self, idempotency_key: str | None) -> bool:
        return self.config.idempotent or idempotency_key is not None

    def _recover(self, ctx: CallContext, error: BaseException) -> Any:
        if (
            self.fallback is None
            or isinstance(error, PermanentError)
            or not isinstance(error, self._fallback_on)
        ):
            self._count("rejected" if isinstance(error, RejectedError) else "failure")
            raise error
        try:
            result = self.fallback.recover(ctx, error)
        except NoFallback:
            self._count("failure")
            raise error from None
        except BaseException:
            self._count("failure")
            raise
        self._count("fallback")
        self.events.emit(FallbackServed(self.name, self.fallback.kind))
        return result

    def _enter_deadline(self, start: float) -> contextvars.Token:
        """Publish the call's total budget from ``start`` (an enclosing tighter one wins)."""
        expires = start + self._deadline_s
        outer = _deadline._current.get()
        if outer is not None and outer.expires_at <= expires:
            return _deadline._current.set(outer)
        return _deadline._current.set(_deadline.new_deadline(expires, self.clock))

    def _attempt(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        """One attempt: breaker permit, the timed call, its outcome recorded."""
        breaker, clock = self.breaker, self.clock
        permit = breaker.acquire()
        start = clock.now()
        try:
            result = self.timeout.call(fn, *args, **kwargs)
        except BaseException as exc:
            took = clock.now() - start
            breaker.record(permit, exc, took)
            self.stats.other(took)
            raise
        took = clock.now() - start
        breaker.record(permit, None, took)
        self.stats.other(took)
        return result

    # -- sync
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
        if self._admits:
            self._admit(prio, client)
        now = self._now()
        if now >= self.stats.fold_at:
            self.stats.fold()
        generation = self._closed_generation(now) if self._inline else None
        if generation is None:
            return self._call_full(fn, args, kwargs, idempotency_key, prio)
        # The success path (module docstring): attempt 1, inline, under the nearer of the
        # attempt timeout and an enclosing deadline (this call's own deadline is longer).
        expires = now + self._timeout_s
        outer = _deadline._current.get()
        if outer is not None and outer.expires_at < expires:
            expires = outer.expires_at
            if expires <= now:
                return self._call_full(fn, args, kwargs, idempotency_key, prio)
        try:
            self._take_slot()
        except queue.Empty:  # full: the full path waits for a slot or rejects
            return self._call_full(fn, args, kwargs, idempotency_key, prio)
        token = _deadline._current.set(_deadline.new_deadline(expires, self.clock))
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _deadline._current.reset(token)
            self._release_slot()
            return self._first_failed(exc, now, expires, generation,
                                      fn, args, kwargs, idempotency_key, prio)
        _deadline._current.reset(token)
        self._release_slot()
        end = self._now()
        took = end - now
        if end >= expires or took >= self._slow_s:
            return self._first_late_or_slow(result, now, end, expires, generation,
                                            fn, args, kwargs, idempotency_key, prio)
        self._count_breaker_success(generation)
        self._record_first_success(took)
        if self.fallback is not None:
            self._remember(result, fn, args, kwargs, idempotency_key, prio)
        return result

    def _remember(self, result: Any, fn: Callable, args: tuple, kwargs: dict, key: str | None,
                  prio: Priority) -> Any:
        """Let the fallback see a success (a cached fallback keeps the answer)."""
        if self.fallback is not None:
            ctx = CallContext(self.name, _task_name(fn), args, kwargs, key, int(prio))
            self.fallback.on_success(ctx, result)
        return result

    def _first_late_or_slow(self, result: Any, start: float, end: float, expires: float,
                            generation: int, fn: Callable, args: tuple, kwargs: dict,
                            key: str | None, prio: Priority) -> Any:
        """Attempt 1 on the success path returned, but late (a timeout) or slow."""
        if end >= expires:
            late = LateResult(str(self.timeout._expired(expires - start)), result)
            return self._first_failed(late, start, expires, generation,
                                      fn, args, kwargs, key, prio)
        self.breaker.record(Permit(False, generation, start), None, end - start)  # slow
        self.stats.success(end - start)
        return self._remember(result, fn, args, kwargs, key, prio)

    def _first_failed(self, exc: BaseException, start: float, expires: float, generation: int,
                      fn: Callable, args: tuple, kwargs: dict, key: str | None,
                      prio: Priority) -> Any:
        """Attempt 1 on the success path failed: record it, then retry or fall back as the
        full path would (tenacity resumes with this failure as its attempt 1)."""
        end = self._now()
        if isinstance(exc, Exception) and end >= expires and not isinstance(exc, AttemptTimeout):
            late = self.timeout._expired(expires - start)  # a late error is a timeout too
            late.__cause__ = exc
            exc = late
        self.breaker.record(Permit(False, generation, start), exc, end - start)
        self.stats.other(end - start)
        if not isinstance(exc, Exception):
            raise exc  # cancellation and interrupts surface as they are
        self.stats.fold()  # the budget sees every earlier success before a retry is decided
        self.retry_budget.record_request()
        try:
            if not self._retryable(key):
                return self._no_retry(exc, fn, args, kwargs, key, prio)
            token = self._enter_deadline(start)  # the call's budget, counted from attempt 1
            try:
                result = self.retrier.resume(
                    exc, functools.partial(self._attempt, fn, args, kwargs))
            finally:
                _deadline._current.reset(token)
        except Exception as error:
            ctx = CallContext(self.name, _task_name(fn), args, kwargs, key, int(prio))
            return self._recover(ctx, error)
        self._count("success")
        return self._remember(result, fn, args, kwargs, key, prio)

    def _no_retry(self, exc: Exception, fn: Callable, args: tuple, kwargs: dict,
                  key: str | None, prio: Priority) -> Any:
        """A call that may not be retried failed once. A late *result* is returned all the
        same: its effect happened and nothing may redo it, so reporting a failure would only
        hide a done charge (the breaker has counted the timeout). Anything else is raised."""
        if isinstance(exc, LateResult):
            log.warning("%s: answered after the attempt timeout; the result is kept (the call "
                        "may not be retried, its effect happened)", self.name)
            self._count("success")
            return self._remember(exc.result, fn, args, kwargs, key, prio)
        raise exc

    def _call_full(self, fn: Callable[..., T], args: tuple, kwargs: dict, key: str | None,
                   prio: Priority) -> T | Any:
        """The chain layer by layer: deadline, retry, breaker, bulkhead, timeout."""
        retryable = self._retryable(key)
        token = self._enter_deadline(self.clock.now())
        try:
            try:
                result = self.retrier.call(
                    functools.partial(self._attempt, fn, args, kwargs), retryable=retryable)
            finally:
                _deadline._current.reset(token)
        except Exception as exc:
            if not retryable and isinstance(exc, LateResult):
                return self._no_retry(exc, fn, args, kwargs, key, prio)
            ctx = CallContext(self.name, _task_name(fn), args, kwargs, key, int(prio))
            return self._recover(ctx, exc)
        self._count("success")
        return self._remember(result, fn, args, kwargs, key, prio)

    # -- async
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
        self._admit(prio, client)

        async def attempt() -> T:
            permit = self.breaker.acquire()
            start = self.clock.now()
            try:
                result = await self.timeout.acall(fn, *args, **kwargs)
            except BaseException as exc:
                took = self.clock.now() - start
                self.breaker.record(permit, exc, took)
                self.stats.other(took)
                raise
            took = self.clock.now() - start
            self.breaker.record(permit, None, took)
            self.stats.other(took)
            return result

        try:
            with _deadline.deadline_scope(self.config.deadline, clock=self.clock):
                result = await self.retrier.acall(
                    attempt, retryable=self._retryable(idempotency_key)
                )
        except Exception as exc:
            ctx = CallContext(self.name, _task_name(fn), args, kwargs, idempotency_key, int(prio))
            return self._recover(ctx, exc)
        self._count("success")
        return self._remember(result, fn, args, kwargs, idempotency_key, prio)

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
        return f"Policy({self.name!r}, breaker={self.breaker.state.value})"


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
