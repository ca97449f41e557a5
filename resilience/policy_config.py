"""A dependency's policy as the policy file states it: ``PolicyConfig`` (immutable, the seed's
defaults), the file's keys and units, and the fallback strategy a spec names.

:mod:`resilience.policy` builds the chain from it (and re-exports everything here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from .adaptive import AdaptiveLimitConfig
from .breaker import BreakerConfig
from .bulkhead import BulkheadConfig
from .errors import ConfigError
from .events import EVENTS, EventBus
from .fallback import CachedValue, DefaultValue, DeferralSink, Fallback, Graceful, QueueForLater
from .hedge import HedgeConfig
from .ratelimit import RateLimitConfig
from .retry import RetryConfig
from .stores import Cache, MemoryCache
from .timeout import DEFAULT_TIMEOUT_MODE, check_timeout, check_timeout_mode

__all__ = [
    "FALLBACK_KINDS",
    "FILE_KEYS",
    "FILE_SECTIONS",
    "LEAD_KEYS",
    "FallbackSpec",
    "PolicyConfig",
    "build_fallback",
]

P99X2 = "p99x2"  # ``timeout_ms = "p99x2"``: the seed's rule, applied live
FALLBACK_KINDS = ("none", "cached", "default", "graceful", "queue")
LEAD_KEYS = frozenset({"queue", "url", "tasks"})  # read by workers/, ignored here


# The policy file's keys -> (PolicyConfig or section attribute, divisor to seconds): a
# dependency's top-level numbers, then its sub-tables. ``timeout`` holds flat fields.
FILE_KEYS: Mapping[str, tuple[str, float]] = MappingProxyType({
    "idempotent": ("idempotent", 1),
    "timeout_ms": ("timeout", 1000),
    "deadline_ms": ("deadline", 1000),
    "layers": ("layers", 1),  # the chain's layers, outermost first (default: DEFAULT_LAYERS)
})
FILE_SECTIONS: Mapping[str, Mapping[str, tuple[str, float]]] = MappingProxyType({
    "timeout": {  # flat fields: ``timeout.mode = "abandon"``; bounds of ``timeout_ms = "p99x2"``
        "mode": ("timeout_mode", 1),
        "floor_ms": ("timeout_floor", 1000),
        "ceiling_ms": ("timeout_ceiling", 1000),
    },
    "retry": {
        "max_attempts": ("max_attempts", 1),
        "base_s": ("base", 1),
        "max_wait_s": ("max_wait", 1),
        "pause_ms": ("pause", 1000),
        "in_call_attempts": ("in_call_attempts", 1),
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
        "mode": ("mode", 1),  # "static" (max_concurrent) or "adaptive" (min..max, initial)
        "min": ("min", 1),
        "max": ("max", 1),
        "initial": ("initial", 1),
    },
    "rate_limit": {"rate_per_s": ("rate", 1), "burst": ("burst", 1)},
    "hedge": {  # delay_ms, or delay = "p95" (from initial_ms, never below floor_ms)
        "delay_ms": ("delay", 1000),
        "delay": ("percentile", 1),
        "max": ("max", 1),
        "floor_ms": ("floor", 1000),
        "initial_ms": ("initial", 1000),
    },
    "fallback": {
        "kind": ("kind", 1),
        "ttl_s": ("ttl", 1),
        "value": ("value", 1),
        "message": ("message", 1),
        "message_unknown": ("unknown_message", 1),
        "max_deferrals": ("max_deferrals", 1),
    },
})

@dataclass(frozen=True)
class FallbackSpec:
    kind: str = "none"
    ttl: float = 300.0  # cached: how stale an answer may be served
    value: Any = None  # default: the value returned
    message: str | None = None  # graceful: what users read when nothing reached it
    unknown_message: str | None = None  # graceful: ... when an attempt may have taken effect
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


def _check_layers(name: str, layers: Any) -> tuple[str, ...]:
    """A list of known layer names, each once (the names of DEFAULT_LAYERS)."""
    from .errors import did_you_mean
    from .policy import DEFAULT_LAYERS  # the one list of layers; imported late (it imports us)

    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise ConfigError(f"{name}: layers must be a list of layer names, got {layers!r}")
    for n in layers:
        if n not in DEFAULT_LAYERS:
            raise ConfigError(f"{name}: unknown layer {n!r}{did_you_mean(n, DEFAULT_LAYERS)} "
                              f"(layers: {', '.join(DEFAULT_LAYERS)})")
    dup = sorted({n for n in layers if list(layers).count(n) > 1})
    if dup:
        raise ConfigError(f"{name}: layer {dup[0]!r} listed twice")
    return tuple(layers)


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
    adaptive_limit: AdaptiveLimitConfig | None = None  # ``bulkhead.mode = "adaptive"``
    hedge: HedgeConfig | None = None  # idempotent dependencies only
    layers: tuple[str, ...] | None = None  # outermost first; None: DEFAULT_LAYERS' order
    # ``timeout_ms = "p99x2"``: the timeout follows P99 x 2 within [floor, ceiling]; it
    # starts at the ceiling (no healthy call times out before there is data)
    adaptive_timeout: bool = False
    timeout_floor: float | None = None  # default 10 ms
    timeout_ceiling: float | None = None  # default half the deadline: one retry fits

    def __post_init__(self) -> None:
        if self.adaptive_timeout:
            floor = 0.01 if self.timeout_floor is None else self.timeout_floor
            ceiling = self.deadline / 2 if self.timeout_ceiling is None else self.timeout_ceiling
            check_timeout(floor, f"{self.name}: timeout floor_ms")
            check_timeout(ceiling, f"{self.name}: timeout ceiling_ms")
            if floor > ceiling:
                raise ConfigError(f"{self.name}: timeout floor_ms ({floor * 1000:g}) exceeds "
                                  f"ceiling_ms ({ceiling * 1000:g})")
            for attr, value in (("timeout_floor", floor), ("timeout_ceiling", ceiling),
                                ("timeout", ceiling)):
                object.__setattr__(self, attr, value)
        elif self.timeout_floor is not None or self.timeout_ceiling is not None:
            raise ConfigError(f"{self.name}: timeout floor_ms / ceiling_ms bound an adaptive "
                              f'timeout only (timeout_ms = "{P99X2}")')
        if self.layers is not None:
            object.__setattr__(self, "layers", _check_layers(self.name, self.layers))
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
        h = self.hedge
        if h is not None and h.percentile is not None:  # resolve the defaults (hedge.py)
            initial = h.initial if h.initial is not None else max(h.min_delay, self.timeout / 2)
            object.__setattr__(self, "hedge", replace(h, floor=h.min_delay, initial=initial))
        if self.hedge is not None and not self.idempotent:
            raise ConfigError(f"{self.name}: not idempotent, so it may not hedge (a hedge runs "
                              "the call twice at once; set idempotent = true)")
        for wanted, layer in ((self.adaptive_limit, "adaptive_limit"), (self.hedge, "hedge")):
            if wanted is not None and self.layers is not None and layer not in self.layers:
                # a configured pattern whose layer is left out would silently not run
                raise ConfigError(f"{self.name}: {layer.replace('_limit', '')} is configured "
                                  f"but the layers list leaves out {layer!r}")

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
        if table.get("timeout_ms") == P99X2:  # follows the observed P99 (Policy.follow_p99)
            del table["timeout_ms"]
            kw["adaptive_timeout"] = True
        top, sections = FILE_KEYS, FILE_SECTIONS
        builders = {
            "retry": RetryConfig,
            "breaker": BreakerConfig,
            "bulkhead": BulkheadConfig,
            "rate_limit": RateLimitConfig,
            "fallback": FallbackSpec,
            "hedge": HedgeConfig,
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
                if key == "bulkhead":
                    args = _bulkhead_args(path, args, kw)
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


BULKHEAD_MODES = ("static", "adaptive")
_ADAPTIVE_KEYS = ("min", "max", "initial")


def _bulkhead_args(path: str, args: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    """Split a bulkhead table: ``mode = "adaptive"`` puts an :class:`AdaptiveLimitConfig` in
    ``kw`` (min, max, initial, and the table's max_wait); the rest builds the static
    bulkhead (its pool still serves an abandoning timeout)."""
    args = dict(args)
    mode = args.pop("mode", "static")
    adaptive = {k: args.pop(k) for k in _ADAPTIVE_KEYS if k in args}
    if mode not in BULKHEAD_MODES:
        raise ConfigError(f"{path}.mode must be one of {', '.join(BULKHEAD_MODES)}, "
                          f"got {mode!r}")
    if mode == "static":
        if adaptive:
            raise ConfigError(f"{path}: {', '.join(adaptive)} need mode = \"adaptive\"")
        return args
    if "max_wait" in args:
        adaptive["max_wait"] = args["max_wait"]
    try:
        kw["adaptive_limit"] = AdaptiveLimitConfig(**adaptive)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return args


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
        return Graceful(spec.message, spec.unknown_message)
    if deferral_sink is None:
        raise ConfigError(f"{dependency}: fallback kind 'queue' needs a deferral sink")
    return QueueForLater(deferral_sink, spec.max_deferrals, events=events)
