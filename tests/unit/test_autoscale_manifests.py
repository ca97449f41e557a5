"""deploy/: the KEDA ScaledObjects are the generator's output for the policy file, and the
Prometheus config agrees with the exporter."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from resilience.errors import ConfigError
from tidegate.cli import app
from tidegate.exporter import QUEUE_GAUGES
from tidegate.keda import BROKERS, render, scaling_for
from workers.autoscale import load_scaling_policies, target_backlog_per_worker
from workers.settings import DEFAULT_POLICY_FILE
from workers.topology import load_topology, redis_priority_lists

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
QUEUES = set(load_topology(DEFAULT_POLICY_FILE).work_queues)
DEFAULT, PER_QUEUE = load_scaling_policies(DEFAULT_POLICY_FILE)


def policy(queue: str):
    return PER_QUEUE.get(queue, DEFAULT)


def target(queue: str) -> str:
    return str(target_backlog_per_worker(policy(queue), None))


# The fields of KEDA's ScaledObject (keda.sh/v1alpha1, 2.18) and of the scalers used here.
SPEC = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
        "cooldownPeriod", "idleReplicaCount", "initialCooldownPeriod", "fallback", "advanced",
        "triggers"}
ADVANCED = {"horizontalPodAutoscalerConfig", "scalingModifiers", "restoreToOriginalReplicaCount"}
HPA_CONFIG = {"name", "behavior"}
RULES = {"stabilizationWindowSeconds", "selectPolicy", "policies", "tolerance"}
MODIFIERS = {"formula", "target", "activationTarget", "metricType"}
TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
SCALER_METADATA = {
    "redis": {"address", "host", "port", "databaseIndex", "listName", "listLength",
              "activationListLength", "enableTLS", "unsafeSsl"},
    "rabbitmq": {"host", "protocol", "queueName", "vhostName", "mode", "value",
                 "activationValue", "useRegex", "excludeUnacknowledged", "operation",
                 "timeout"},
    "aws-sqs-queue": {"queueURL", "queueURLFromEnv", "awsRegion", "awsEndpoint", "queueLength",
                      "activationQueueLength", "scaleOnInFlight", "scaleOnDelayed",
                      "identityOwner"},
    "prometheus": {"serverAddress", "query", "threshold", "activationThreshold",
                   "ignoreNullValues", "namespace", "customHeaders", "queryParameters",
                   "unsafeSsl"},
}


def objects(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "keda" / name).read_text()) if d]
    assert all(d["kind"] == "ScaledObject" for d in docs)
    assert all(d["apiVersion"] == "keda.sh/v1alpha1" for d in docs)
    by_queue = {d["metadata"]["labels"]["tidegate.io/queue"]: d for d in docs}
    assert len(by_queue) == len(docs)
    return by_queue


@pytest.mark.parametrize("broker", BROKERS)
def test_shipped_files_are_the_generators_output(broker):
    shipped = (DEPLOY / "keda" / f"scaledobjects-{broker}.yaml").read_text()
    assert shipped == render(broker, DEFAULT_POLICY_FILE), (
        f"deploy/keda/scaledobjects-{broker}.yaml drifted from the policy file: run "
        f"tidegate deploy keda --broker {broker} > deploy/keda/scaledobjects-{broker}.yaml")


@pytest.mark.parametrize("broker", BROKERS)
def test_only_known_keda_fields(broker):
    for doc in objects(f"scaledobjects-{broker}.yaml").values():
        spec = doc["spec"]
        assert set(spec) <= SPEC
        assert set(spec["advanced"]) <= ADVANCED
        hpa = spec["advanced"]["horizontalPodAutoscalerConfig"]
        assert set(hpa) <= HPA_CONFIG
        assert set(hpa["behavior"]) <= {"scaleUp", "scaleDown"}
        for rules in hpa["behavior"].values():
            assert set(rules) <= RULES
        assert set(spec["advanced"].get("scalingModifiers", {})) <= MODIFIERS
        for trigger in spec["triggers"]:
            assert set(trigger) <= TRIGGER
            assert set(trigger["metadata"]) <= SCALER_METADATA[trigger["type"]]
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), \
                "KEDA trigger metadata values are strings"


@pytest.mark.parametrize("broker", BROKERS)
def test_one_scaled_object_per_worker_queue_with_the_policys_figures(broker):
    by_queue = objects(f"scaledobjects-{broker}.yaml")
    assert set(by_queue) == QUEUES
    for queue, doc in by_queue.items():
        spec = doc["spec"]
        assert doc["metadata"]["name"] == f"tidegate-worker-{queue}-{broker}"
        assert spec["scaleTargetRef"]["name"] == f"tidegate-worker-{queue}"
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
            policy(queue).min_workers, policy(queue).max_workers)
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert not any(k in meta for k in ("password", "username")), "secrets in a file"


def test_names_unique_across_variants():
    names = [d["metadata"]["name"] for b in BROKERS
             for d in objects(f"scaledobjects-{b}.yaml").values()]
    assert len(names) == len(set(names))


def test_targets_follow_each_queues_concurrency():
    # payments -c 20, search -c 50, email -c 8 at 30 s and 1 s: what the policy file says.
    assert {q: target(q) for q in QUEUES} == {"payments": "600", "search": "1500",
                                              "email": "240", "default": "120"}


def test_redis_sums_every_priority_list():
    for queue, doc in objects("scaledobjects-redis.yaml").items():
        triggers = doc["spec"]["triggers"]
        lists = {t["name"]: t["metadata"]["listName"] for t in triggers}
        assert list(lists.values()) == redis_priority_lists(queue)  # kombu's own layout
        assert list(lists) == ["p0", "p3", "p6", "p9"]
        modifiers = doc["spec"]["advanced"]["scalingModifiers"]
        assert modifiers["formula"].replace(" ", "") == "p0+p3+p6+p9"
        assert (modifiers["target"], modifiers["metricType"]) == (target(queue), "AverageValue")
        window = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert window["scaleDown"]["stabilizationWindowSeconds"] == \
            policy(queue).scale_down_window_s


def test_rabbitmq_and_sqs_count_what_is_being_worked_on():
    for queue, doc in objects("scaledobjects-rabbitmq.yaml").items():
        meta = doc["spec"]["triggers"][0]["metadata"]
        assert (meta["mode"], meta["protocol"], meta["value"]) == ("QueueLength", "http",
                                                                   target(queue))
    for queue, doc in objects("scaledobjects-sqs.yaml").items():
        meta = doc["spec"]["triggers"][0]["metadata"]
        assert meta["scaleOnInFlight"] == "true"
        assert meta["queueURL"].endswith("/" + queue.replace(".", "-"))
        assert meta["queueLength"] == target(queue)


def test_prometheus_variant_copies_desired_workers_exactly():
    exported = {name for name, _, _ in QUEUE_GAUGES}
    assert "tidegate_desired_workers" in exported
    for queue, doc in objects("scaledobjects-prometheus.yaml").items():
        trigger = doc["spec"]["triggers"][0]
        assert trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["threshold"] == "1"
        assert trigger["metadata"]["query"] == f'max(tidegate_desired_workers{{queue="{queue}"}})'
        behavior = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        # 10 running vs 11 wanted is a ratio of 1.1: the default tolerance (0.1) would hold 10.
        assert behavior["scaleUp"]["tolerance"] == behavior["scaleDown"]["tolerance"] == "0"
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 0  # the exporter's window


def test_generator_follows_another_policy_file(tmp_path):
    text = DEFAULT_POLICY_FILE.read_text().split("# Autoscaling")[0] + """
[autoscaling]
min_workers = 0
max_workers = 7
scale_down_window_s = 120
[autoscaling.search]
worker_concurrency = 10
acceptable_wait_s = 5
default_processing_s = 0.5
"""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    by_queue = {q.queue: q for q in scaling_for(path)}
    assert by_queue["search"].target == 100  # 5 s x 10 / 0.5 s
    assert by_queue["payments"].target == 120  # defaults: 30 s x 4 / 1 s
    docs = {d["metadata"]["labels"]["tidegate.io/queue"]: d
            for d in yaml.safe_load_all(render("rabbitmq", path)) if d}
    spec = docs["search"]["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 7, 120)
    assert spec["triggers"][0]["metadata"]["value"] == "100"


def test_autoscaling_table_for_an_unknown_queue_is_refused(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(DEFAULT_POLICY_FILE.read_text() + "\n[autoscaling.serach]\nmin_workers = 2\n")
    with pytest.raises(ConfigError, match=r"\[autoscaling\.serach\]: unknown queue; "
                                          r"did you mean 'search'"):
        scaling_for(path)


def test_cli_prints_a_variant_and_refuses_an_unknown_one():
    runner = CliRunner()
    ok = runner.invoke(app, ["deploy", "keda", "--broker", "sqs",
                             "--sqs-queue-url-prefix", "https://example.invalid/1/"])
    assert ok.exit_code == 0, ok.output
    urls = [d["spec"]["triggers"][0]["metadata"]["queueURL"]
            for d in yaml.safe_load_all(ok.stdout) if d]
    assert "https://example.invalid/1/payments" in urls
    bad = runner.invoke(app, ["deploy", "keda", "--broker", "kafka"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "tidegate: error: --broker must be one of redis, rabbitmq, sqs, prometheus, "
        "got 'kafka'"]


def test_prometheus_scrapes_the_exporter():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["tidegate-exporter"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["exporter:9808"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "tidegate-alerts.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    assert "tidegate_breaker_state" in exprs and "tidegate_cluster_sheds_total" in exprs
