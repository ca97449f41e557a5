"""KEDA ScaledObjects generated from the policy file, so they cannot drift from it.

Every figure a manifest carries comes from the policy file's ``[autoscaling]`` tables
(workers.autoscale) and its queues (workers.topology): min/max workers, the scale-down window
and, for the native scalers, the target backlog per worker
(``acceptable_wait_s x worker_concurrency / default_processing_s``). Hand-edited manifests
used one target (120) for every queue while the policy gave payments 600 and search 1500.

Four variants, alternatives to one another (apply exactly one): ``redis``, ``rabbitmq`` and
``sqs`` read the broker directly with a fixed target; ``prometheus`` copies the exporter's
``tidegate_desired_workers``, which uses the observed processing time. Object names carry the
variant, so applying a second variant never silently rewrites the first.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from resilience.errors import ConfigError
from workers.autoscale import ScalingPolicy, load_scaling_policies, target_backlog_per_worker
from workers.topology import REDIS_PRIORITY_STEPS, REDIS_SEP, load_topology

__all__ = ["BROKERS", "Endpoints", "QueueScaling", "render", "scaling_for"]

BROKERS = ("redis", "rabbitmq", "sqs", "prometheus")
POLLING_INTERVAL_S = 15
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Endpoints:
    """Where the scalers look. Credentials never go here: TriggerAuthentication holds them."""

    redis_address: str = "redis-broker.tidegate.svc:6379"
    redis_db: int = 0
    rabbitmq_vhost: str = "/"
    sqs_queue_url_prefix: str = "https://sqs.eu-west-1.amazonaws.com/123456789012/"
    sqs_region: str = "eu-west-1"
    prometheus_url: str = "http://prometheus.monitoring.svc:9090"


@dataclass(frozen=True)
class QueueScaling:
    """One work queue and the figures its ScaledObject carries."""

    queue: str
    policy: ScalingPolicy
    target: int  # messages per worker at the default processing time

    @property
    def deployment(self) -> str:
        return f"tidegate-worker-{self.queue}"


def scaling_for(policy_file: Path) -> list[QueueScaling]:
    """Each work queue of the policy file with its autoscaling policy, in file order (the
    policy file's schema refuses an ``[autoscaling.QUEUE]`` table for an unknown queue)."""
    default, per_queue = load_scaling_policies(policy_file)
    queues = load_topology(policy_file).work_queues
    out = []
    for queue in queues:
        policy = per_queue.get(queue, default)
        out.append(QueueScaling(queue, policy, target_backlog_per_worker(policy, None)))
    return out


def _behavior(window_s: float, *, tolerance: str | None) -> dict[str, Any]:
    down: dict[str, Any] = {"stabilizationWindowSeconds": int(window_s)}
    up: dict[str, Any] = {"stabilizationWindowSeconds": 0}
    if tolerance is not None:  # HPA field behind HPAConfigurableTolerance; KEDA >= 2.18
        down["tolerance"] = tolerance
        up["tolerance"] = tolerance
    return {"scaleDown": down, "scaleUp": up}


def _object(q: QueueScaling, broker: str, advanced: dict[str, Any],
            triggers: list[dict[str, Any]], *, cooldown_s: float | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": f"{q.deployment}-{broker}",
            "labels": {"app.kubernetes.io/part-of": "tidegate", "tidegate.io/queue": q.queue,
                       "tidegate.io/scaler": broker},
        },
        "spec": {
            "scaleTargetRef": {"name": q.deployment},
            "minReplicaCount": q.policy.min_workers,
            "maxReplicaCount": q.policy.max_workers,
            "pollingInterval": POLLING_INTERVAL_S,
            # Only used to go from 1 to 0 replicas (min_workers = 0): the same window.
            "cooldownPeriod": int(q.policy.scale_down_window_s if cooldown_s is None
                                  else cooldown_s),
            "advanced": advanced,
            "triggers": triggers,
        },
    }


def _redis(q: QueueScaling, ends: Endpoints) -> dict[str, Any]:
    names = [f"p{step}" for step in REDIS_PRIORITY_STEPS]
    triggers = [{
        "type": "redis",
        "name": name,
        "metadata": {
            "address": ends.redis_address,
            "databaseIndex": str(ends.redis_db),
            "listName": q.queue if step == 0 else f"{q.queue}{REDIS_SEP}{step}",
            "listLength": str(q.target),
            "activationListLength": "0",
        },
        "authenticationRef": {"name": "tidegate-redis-broker"},
    } for name, step in zip(names, REDIS_PRIORITY_STEPS, strict=True)]
    advanced = {
        "horizontalPodAutoscalerConfig": {
            "behavior": _behavior(q.policy.scale_down_window_s, tolerance=None)},
        "scalingModifiers": {"formula": " + ".join(names), "target": str(q.target),
                             "metricType": "AverageValue"},
    }
    return _object(q, "redis", advanced, triggers)


def _rabbitmq(q: QueueScaling, ends: Endpoints) -> dict[str, Any]:
    trigger = {
        "type": "rabbitmq",
        "metadata": {"protocol": "http", "queueName": q.queue, "vhostName": ends.rabbitmq_vhost,
                     "mode": "QueueLength", "value": str(q.target), "activationValue": "0"},
        "authenticationRef": {"name": "tidegate-rabbitmq"},
    }
    advanced = {"horizontalPodAutoscalerConfig": {
        "behavior": _behavior(q.policy.scale_down_window_s, tolerance=None)}}
    return _object(q, "rabbitmq", advanced, [trigger])


def _sqs(q: QueueScaling, ends: Endpoints) -> dict[str, Any]:
    trigger = {
        "type": "aws-sqs-queue",
        "metadata": {"queueURL": ends.sqs_queue_url_prefix + q.queue.replace(".", "-"),
                     "awsRegion": ends.sqs_region, "queueLength": str(q.target),
                     "activationQueueLength": "0", "scaleOnInFlight": "true",
                     "scaleOnDelayed": "false"},
        "authenticationRef": {"name": "tidegate-aws"},
    }
    advanced = {"horizontalPodAutoscalerConfig": {
        "behavior": _behavior(q.policy.scale_down_window_s, tolerance=None)}}
    return _object(q, "sqs", advanced, [trigger])


def _prometheus(q: QueueScaling, ends: Endpoints) -> dict[str, Any]:
    trigger = {
        "type": "prometheus",
        "metricType": "AverageValue",
        "metadata": {"serverAddress": ends.prometheus_url,
                     "query": f'max(tidegate_desired_workers{{queue="{q.queue}"}})',
                     "threshold": "1", "activationThreshold": "0", "ignoreNullValues": "false"},
    }
    # The exporter already stabilises (scale_down_window_s) and computes the exact figure:
    # no second window, and tolerance 0 so 10 running vs 11 wanted becomes 11.
    # The published 0 has already lasted the window: one polling interval before scaling to 0.
    advanced = {"horizontalPodAutoscalerConfig": {"behavior": _behavior(0, tolerance="0")}}
    return _object(q, "prometheus", advanced, [trigger], cooldown_s=POLLING_INTERVAL_S)


_BUILDERS = {"redis": _redis, "rabbitmq": _rabbitmq, "sqs": _sqs, "prometheus": _prometheus}

_HEADERS = {
    "redis": """\
Redis broker (kombu lists). kombu keeps each priority in its own list - "<queue>"
(priority 0, CRITICAL), "<queue>\\x06\\x163", "...6", "...9" (LOW; "\\x06\\x16" is kombu's
separator, a YAML escape here) - and KEDA's redis scaler reads one list; several triggers
alone would be combined by the HPA as a MAX, under-counting, so scalingModifiers sums them
(KEDA >= 2.12). Not counted: messages reserved by a worker (kombu's shared "unacked" hash);
the prometheus variant counts them.""",
    "rabbitmq": """\
RabbitMQ broker. mode QueueLength over the management API (protocol http) counts ready +
unacknowledged messages, so tasks being worked on keep their workers; over amqp KEDA would see
ready messages only. The host (with credentials) comes from the Secret behind
TriggerAuthentication tidegate-rabbitmq, never from this file.""",
    "sqs": """\
SQS broker. scaleOnInFlight counts ApproximateNumberOfMessagesNotVisible (received, not
deleted): the tasks being worked on. Delayed messages (countdown retries) are not runnable
yet: not counted. kombu names SQS queues after the Celery queue with dots as dashes.
Credentials: pod identity (IRSA) through TriggerAuthentication tidegate-aws.""",
    "prometheus": """\
Any broker, through `tidegate exporter`. The exporter computes desired workers per queue
from the OBSERVED processing time, clamped and stabilised over scale_down_window_s, so the
HPA copies it: AverageValue with threshold 1 makes ceil(value / 1) = tidegate_desired_workers.
The HPA's own scale-down window is 0 (two windows would add up) and its tolerance 0 (the
default 10% would keep 10 workers when 11 are wanted): `tolerance` needs KEDA >= 2.18 and
Kubernetes >= 1.33 with the HPAConfigurableTolerance feature gate.""",
}

_NATIVE_NOTE = """\
Target per worker = acceptable_wait_s x worker_concurrency / default_processing_s, per queue
from the policy file; native scalers cannot see the observed processing time (the prometheus
variant can). Tolerance stays at the cluster default (10%): the target is an estimate."""


def _header(broker: str, policy_file: Path) -> Iterator[str]:
    yield f"# KEDA ScaledObjects, {broker} variant. GENERATED from the policy file: do not edit."
    yield f"#   tidegate deploy keda --broker {broker} --policy {policy_file}"
    yield "# Apply exactly one scaledobjects-*.yaml (plus trigger-auth.yaml): the variants are"
    yield "# alternatives for the same Deployments tidegate-worker-<queue> (docs/autoscaling.md)."
    yield "#"
    for line in _HEADERS[broker].splitlines():
        yield f"# {line}"
    if broker != "prometheus":
        yield "#"
        for line in _NATIVE_NOTE.splitlines():
            yield f"# {line}"


def _queue_comment(q: QueueScaling) -> str:
    p = q.policy
    return (f"# {q.queue}: workers {p.min_workers}..{p.max_workers}, -c {p.worker_concurrency}, "
            f"target {q.target} = {p.acceptable_wait_s:g} s x {p.worker_concurrency} / "
            f"{p.default_processing_s:g} s, scale-down window {p.scale_down_window_s:g} s")


def _shown(path: Path) -> Path:
    """The policy file as the header names it: relative to the checkout when inside it."""
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def render(broker: str, policy_file: Path, endpoints: Endpoints | None = None) -> str:
    """The YAML text of one variant for every work queue of ``policy_file``."""
    if broker not in _BUILDERS:
        raise ConfigError(f"unknown KEDA variant {broker!r}; use one of {', '.join(BROKERS)}")
    ends = endpoints or Endpoints()
    out = io.StringIO()
    for line in _header(broker, _shown(policy_file)):
        out.write(line + "\n")
    for q in scaling_for(policy_file):
        out.write("---\n")
        out.write(_queue_comment(q) + "\n")
        yaml.safe_dump(_BUILDERS[broker](q, ends), out, sort_keys=False,
                       default_flow_style=False, width=100)
    return out.getvalue()
