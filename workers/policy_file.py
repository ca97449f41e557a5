"""The policy file's one schema: every section, key and type, checked once when it is loaded.

Every command, worker and producer loads the file through :func:`load_policy_file`, so a typo
stops all of them the same way: each unknown section or key is an error naming its dotted
path and, where one is close, the name meant; a section that names a queue must name one the
``[dependencies.*]`` tables create; watermark order is checked whatever reads the file.
Errors are collected (one line each) and raised together as :class:`PolicyFileError`.

Ranges of the chain's own numbers stay with the frozen configs that enforce them
(:class:`~resilience.policy.PolicyConfig`, :class:`~workers.autoscale.ScalingPolicy`): the
schema checks shape and types, then builds those, and their errors are reported under the
table they came from.
"""

from __future__ import annotations

import functools
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from resilience.errors import ConfigError, did_you_mean
from resilience.policy import PolicyConfig
from resilience.shedding import SheddingThresholds
from workers.autoscale import ScalingPolicy
from workers.shedding import ShedRule
from workers.topology import WORKER_KEYS, Dependency, Topology

__all__ = [
    "DEFAULT_TASK_MODULES",
    "PolicyFile",
    "PolicyFileError",
    "PolicySchema",
    "load_policy_file",
    "parse_policy",
]

# The shipped example's task modules: what ``[app] include`` means when it is left out.
DEFAULT_TASK_MODULES = ("workers.tasks.payments", "workers.tasks.search", "workers.tasks.email")

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _Table(BaseModel):
    """A TOML table: unknown keys refused, values of the declared type only (no coercion),
    frozen once built. ``None`` means "left out": the seed's default applies."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Number = Annotated[float, Field(allow_inf_nan=False)]
Count = int
Url = Annotated[str, Field(pattern=r"^https?://\S+$")]


def _timeout_ms(value: Any) -> Any:
    """A number, or "p99x2" (one error either way, not one per branch of a union)."""
    if value == "p99x2":
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("timeout_ms", 'input should be a valid number (or "p99x2")')
    if value != value or value in (float("inf"), float("-inf")):
        raise PydanticCustomError("timeout_ms", 'input should be a finite number (or "p99x2")')
    return value


TimeoutMs = Annotated[Any, BeforeValidator(_timeout_ms)]


def _percentile(value: Any) -> Any:
    """``hedge.delay``: "p50".."p99" (the delay follows that percentile of the latency)."""
    if not (isinstance(value, str) and re.fullmatch(r"p[5-9][0-9]", value)):
        raise PydanticCustomError("percentile",
                                  'input should be a percentile from "p50" to "p99", like "p95"')
    return value


Percentile = Annotated[Any, BeforeValidator(_percentile)]


class TimeoutTable(_Table):
    mode: Literal["cooperative", "abandon"] | None = None
    floor_ms: Number | None = None  # with timeout_ms = "p99x2"
    ceiling_ms: Number | None = None  # with timeout_ms = "p99x2"


class RetryTable(_Table):
    max_attempts: Count | None = None
    base_s: Number | None = None  # queue scale: the seed's 2-3 / 4-6 / 8-12 s with base 1
    max_wait_s: Number | None = None  # queue scale: no countdown above this
    pause_ms: Number | None = None  # in-call scale: the longest pause between attempts
    in_call_attempts: Count | None = None  # in-call scale: attempts one call may make


class BreakerTable(_Table):
    failure_rate: Number | None = None
    window_s: Number | None = None
    minimum_calls: Count | None = None
    open_s: Number | None = None
    half_open_calls: Count | None = None
    slow_call_ms: Number | None = None
    slow_call_rate: Number | None = None


class BulkheadTable(_Table):
    max_concurrent: Count | None = None
    max_wait_ms: Number | None = None
    mode: Literal["static", "adaptive"] | None = None
    min: Count | None = None  # adaptive: the limit's floor, ceiling and start
    max: Count | None = None
    initial: Count | None = None


class RateLimitTable(_Table):
    rate_per_s: Number
    burst: Count | None = None


class HedgeTable(_Table):
    """``delay_ms = 35``, or ``delay = "p95"``: the delay follows the dependency's observed
    95th percentile (from ``initial_ms``, never below ``floor_ms``)."""

    delay_ms: Number | None = None
    delay: Percentile | None = None
    max: Count | None = None
    floor_ms: Number | None = None  # with delay = "p95"
    initial_ms: Number | None = None  # with delay = "p95": before 20 attempts are in

    @model_validator(mode="after")
    def _one_delay(self) -> HedgeTable:
        if (self.delay_ms is None) == (self.delay is None):
            raise ValueError('give delay_ms (a fixed delay) or delay = "p95", one of them')
        if self.delay is None and (self.floor_ms is not None or self.initial_ms is not None):
            raise ValueError('floor_ms and initial_ms go with delay = "p95"')
        return self


class FallbackTable(_Table):
    kind: Literal["none", "cached", "default", "graceful", "queue"] | None = None
    ttl_s: Number | None = None
    value: Any = None
    message: str | None = None
    message_unknown: str | None = None
    max_deferrals: Count | None = None


class DependencyTable(_Table):
    """``[dependencies.NAME]``: where its work goes (read by workers/) and its chain."""

    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$")] | None = None
    url: Url
    tasks: list[str] | None = None
    idempotent: bool | None = None
    timeout_ms: TimeoutMs | None = None
    deadline_ms: Number | None = None
    layers: list[str] | None = None  # the chain's order, outermost first
    timeout: TimeoutTable | None = None
    retry: RetryTable | None = None
    breaker: BreakerTable | None = None
    bulkhead: BulkheadTable | None = None
    rate_limit: RateLimitTable | None = None
    fallback: FallbackTable | None = None
    hedge: HedgeTable | None = None


class ScalingTable(_Table):
    acceptable_wait_s: Number | None = None
    default_processing_s: Number | None = None
    worker_concurrency: Count | None = None
    min_workers: Count | None = None
    max_workers: Count | None = None
    scale_down_window_s: Number | None = None


class BackpressureTable(_Table):
    low_watermark: Annotated[int, Field(ge=0)] | None = None
    high_watermark: Annotated[int, Field(ge=0)] | None = None
    max_wait_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    poll_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    min_retry_after_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    max_retry_after_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class ShedTable(_Table):
    """A worker's own shedding (workers/shedding.py): the age budget and thresholds."""

    enabled: bool | None = None
    max_age_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    low: Number | None = None
    medium: Number | None = None
    high: Number | None = None


def _split_queues(data: Any) -> Any:
    """``[section]`` keys are defaults for every queue; ``[section.QUEUE]`` tables override."""
    if not isinstance(data, Mapping):
        return data  # reported as "should be a table"
    return {"defaults": {k: v for k, v in data.items() if not isinstance(v, Mapping)},
            "queues": {k: v for k, v in data.items() if isinstance(v, Mapping)}}


class AutoscalingSection(_Table):
    """``[autoscaling]`` defaults and ``[autoscaling.QUEUE]`` tables (docs/autoscaling.md)."""

    defaults: ScalingTable = ScalingTable()
    queues: dict[str, ScalingTable] = {}

    _split = model_validator(mode="before")(_split_queues)


class BackpressureSection(_Table):
    """``[backpressure]`` defaults and ``[backpressure.QUEUE]`` tables (docs/producers.md)."""

    defaults: BackpressureTable = BackpressureTable()
    queues: dict[str, BackpressureTable] = {}

    _split = model_validator(mode="before")(_split_queues)


class QueueTable(_Table):
    queue_type: Literal["classic", "quorum"] | None = None  # RabbitMQ only (docs/ha.md)


class QueuesSection(_Table):
    """``[queues]`` defaults and ``[queues.QUEUE]`` tables: how RabbitMQ declares each work
    queue and its DLQ."""

    defaults: QueueTable = QueueTable()
    queues: dict[str, QueueTable] = {}

    _split = model_validator(mode="before")(_split_queues)


class SheddingSection(_Table):
    """``[shedding]`` defaults and ``[shedding.QUEUE]`` tables (docs/resilience.md)."""

    defaults: ShedTable = ShedTable()
    queues: dict[str, ShedTable] = {}

    _split = model_validator(mode="before")(_split_queues)


class AppSection(_Table):
    """``[app]``: the Celery app's own task modules (imported by every worker)."""

    include: list[Annotated[str, Field(pattern=_MODULE.pattern)]] | None = None


class PolicySchema(_Table):
    """The whole policy file."""

    dependencies: dict[str, DependencyTable]
    autoscaling: AutoscalingSection = AutoscalingSection()
    backpressure: BackpressureSection = BackpressureSection()
    queues: QueuesSection = QueuesSection()
    shedding: SheddingSection = SheddingSection()
    app: AppSection = AppSection()


# whose second path segment is defaults/queues
_SYNTHETIC = {"autoscaling", "backpressure", "queues", "shedding"}


class PolicyFileError(ConfigError):
    """The policy file is invalid; ``errors`` holds one line per problem, each naming its
    dotted path (``str()`` joins them on one line)."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = tuple(errors)
        super().__init__(f"policy file {source}: {'; '.join(errors)}")


@dataclass(frozen=True)
class PolicyFile:
    """The parsed file: its schema model (what was written) and everything built from it."""

    source: str
    schema: PolicySchema
    topology: Topology
    configs: Mapping[str, PolicyConfig]
    scaling_default: ScalingPolicy
    scaling: Mapping[str, ScalingPolicy]
    include: tuple[str, ...]
    # every work queue's worker-side shedding, resolved (max_age_s defaults to the queue's
    # autoscaling acceptable_wait_s)
    shedding: Mapping[str, ShedRule] = field(default_factory=lambda: MappingProxyType({}))

    def backpressure_tables(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """``[backpressure]`` as written (file keys): the defaults, and each queue's table
        merged over them."""
        section = self.schema.backpressure
        top = section.defaults.model_dump(exclude_unset=True)
        return top, {q: {**top, **t.model_dump(exclude_unset=True)}
                     for q, t in section.queues.items()}


def _unwrap(tp: Any) -> Any:
    """The model or dict type inside ``Annotated[...]`` / ``X | None``."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows in the table at ``loc``."""
    node: Any = PolicySchema
    for segment in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(segment))
            node = _unwrap(field.annotation) if field else None
        elif typing.get_origin(node) is dict:
            node = _unwrap(typing.get_args(node)[1])
        else:
            return []
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in _SYNTHETIC and parts[1] in ("defaults", "queues"):
        del parts[1]
    return ".".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    where = f"[{_path(loc)}]" if loc else "[top level]"
    kind = error["type"]
    if kind == "extra_forbidden":
        what = "section" if isinstance(error["input"], Mapping) else "key"
        return f"{where}: unknown {what}{did_you_mean(str(loc[-1]), _known_keys(loc[:-1]))}"
    if kind == "missing":
        return f"{where}: required key missing"
    if kind == "string_pattern_mismatch" and loc[-1] == "url":
        return f"{where}: must be an http(s) URL, got {_short(error['input'])}"
    if kind == "string_pattern_mismatch" and "include" in loc:
        return f"{where}: not a module name, got {_short(error['input'])}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: must be a table, got {_short(error['input'])}"
    message = error["msg"][0].lower() + error["msg"][1:]
    return f"{where}: {message}, got {_short(error['input'])}"


def _queue_errors(section: str, queues: Mapping[str, Any], topology: Topology) -> list[str]:
    known = topology.work_queues
    return [f"[{section}.{q}]: unknown queue{did_you_mean(q, known)}"
            for q in queues if q not in known]


def _chain_error(name: str, message: str) -> str:
    """A PolicyConfig error, under the most precise path it names (its own prefix dropped)."""
    where = f"dependencies.{name}"
    named = re.match(rf"{re.escape(where)}((?:\.\w+)*): (.*)", message)
    if named:
        return f"[{where}{named.group(1)}]: {named.group(2)}"
    return f"[{where}]: {message.removeprefix(f'{name}: ')}"


_ORDERED = frozenset({"low_watermark", "high_watermark", "min_retry_after_s",
                      "max_retry_after_s"})


def _watermark_errors(where: str, table: Mapping[str, Any]) -> list[str]:
    """Backpressure order: low < high and min_retry_after <= max_retry_after (seed: 1000,
    2000, 1 s, 300 s), on the merged values a queue ends up with."""
    low, high = table.get("low_watermark", 1000), table.get("high_watermark", 2000)
    errors = []
    if high <= low:
        errors.append(f"[{where}]: high_watermark ({high}) must exceed low_watermark ({low})")
    lo_ra, hi_ra = table.get("min_retry_after_s", 1.0), table.get("max_retry_after_s", 300.0)
    if lo_ra > hi_ra:
        errors.append(f"[{where}]: min_retry_after_s ({lo_ra:g}) exceeds "
                      f"max_retry_after_s ({hi_ra:g})")
    return errors


def parse_policy(data: Mapping[str, Any], source: str = "<policy>") -> PolicyFile:
    """Validate a parsed TOML document and build everything it declares."""
    try:
        schema = PolicySchema.model_validate(data)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors(include_url=False)]
        if "dependencies" not in data:
            errors = [e for e in errors if not e.startswith("[dependencies]")]
            errors.insert(0, "[dependencies]: no [dependencies.NAME] tables")
        raise PolicyFileError(source, errors) from None
    errors: list[str] = []
    if not schema.dependencies:
        errors.append("[dependencies]: no [dependencies.NAME] tables")
    deps = []
    configs: dict[str, PolicyConfig] = {}
    raw = data["dependencies"]
    for name, table in schema.dependencies.items():
        policy = {k: v for k, v in raw[name].items() if k not in WORKER_KEYS}
        deps.append(Dependency(name, table.queue or name, table.url,
                               tuple(table.tasks if table.tasks is not None else [f"{name}.*"]),
                               MappingProxyType(policy)))
        try:
            configs[name] = PolicyConfig.from_mapping(name, policy)
        except ConfigError as exc:
            errors.append(_chain_error(name, str(exc)))
    topology = Topology(tuple(deps))
    section = schema.queues
    errors += _queue_errors("queues", section.queues, topology)
    default_type = section.defaults.queue_type or "classic"
    types = {q: (section.queues[q].queue_type if q in section.queues else None) or default_type
             for q in topology.work_queues}
    topology = replace(topology, queue_types=MappingProxyType(
        {q: t for q, t in types.items() if t != "classic"}))

    scaling = schema.autoscaling
    errors += _queue_errors("autoscaling", scaling.queues, topology)
    scaling_default, per_queue = ScalingPolicy(), {}
    try:
        scaling_default = replace(ScalingPolicy(),
                                  **scaling.defaults.model_dump(exclude_unset=True))
    except ConfigError as exc:
        errors.append(f"[autoscaling]: {str(exc).removeprefix('autoscaling ')}")
    for queue, table in scaling.queues.items():
        try:
            per_queue[queue] = replace(scaling_default, **table.model_dump(exclude_unset=True))
        except ConfigError as exc:
            errors.append(f"[autoscaling.{queue}]: {str(exc).removeprefix('autoscaling ')}")

    pressure = schema.backpressure
    errors += _queue_errors("backpressure", pressure.queues, topology)
    top = pressure.defaults.model_dump(exclude_unset=True)
    errors += _watermark_errors("backpressure", top)
    for queue, table in pressure.queues.items():
        own = table.model_dump(exclude_unset=True)
        if own.keys() & _ORDERED:  # a queue that sets none inherits what was checked above
            errors += _watermark_errors(f"backpressure.{queue}", {**top, **own})

    shedding = schema.shedding
    errors += _queue_errors("shedding", shedding.queues, topology)
    rules: dict[str, ShedRule] = {}
    for queue in topology.work_queues:
        where = f"shedding.{queue}" if queue in shedding.queues else "shedding"
        table = {**shedding.defaults.model_dump(exclude_unset=True),
                 **(shedding.queues[queue].model_dump(exclude_unset=True)
                    if queue in shedding.queues else {})}
        age = table.pop("max_age_s", None)  # unset: a job without a deadline has no budget
        enabled = table.pop("enabled", True)
        try:
            rules[queue] = ShedRule(age, SheddingThresholds.from_mapping(table), enabled)
        except ConfigError as exc:
            errors.append(f"[{where}]: {exc}")

    if errors:
        raise PolicyFileError(source, list(dict.fromkeys(errors)))
    include = schema.app.include
    return PolicyFile(source, schema, topology, MappingProxyType(configs), scaling_default,
                      MappingProxyType(per_queue),
                      tuple(include) if include is not None else DEFAULT_TASK_MODULES,
                      MappingProxyType(rules))


@functools.lru_cache(maxsize=16)
def _load(path: str, _stamp: tuple[int, int]) -> PolicyFile:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"TIDEGATE_POLICY_FILE {path}: {exc}") from None
    return parse_policy(data, path)


def load_policy_file(path: Path | str) -> PolicyFile:
    """Parse and check the policy file at ``path`` (once per version of the file)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigError(f"TIDEGATE_POLICY_FILE {path}: {exc.strerror or exc}") from None
    return _load(str(path), (stat.st_mtime_ns, stat.st_size))

