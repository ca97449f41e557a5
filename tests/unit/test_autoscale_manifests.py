"""deploy/: the KEDA ScaledObjects and the Prometheus config agree with the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tidegate.exporter import QUEUE_GAUGES
from workers.autoscale import ScalingPolicy, target_backlog_per_worker
from workers.settings import DEFAULT_POLICY_FILE
from workers.topology import load_topology

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
QUEUES = set(load_topology(DEFAULT_POLICY_FILE).work_queues)
TARGET = str(target_backlog_per_worker(ScalingPolicy(), None))


def objects(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "keda" / name).read_text()) if d]
    assert all(d["kind"] == "ScaledObject" for d in docs)
    by_queue = {d["metadata"]["labels"]["tidegate.io/queue"]: d for d in docs}
    assert len(by_queue) == len(docs)
    return by_queue


@pytest.mark.parametrize("name", ["scaledobjects-redis.yaml", "scaledobjects-rabbitmq.yaml",
                                  "scaledobjects-sqs.yaml", "scaledobjects-prometheus.yaml"])
def test_one_scaled_object_per_worker_queue(name):
    by_queue = objects(name)
    assert set(by_queue) == QUEUES
    policy = ScalingPolicy()
    for queue, doc in by_queue.items():
        spec = doc["spec"]
        assert spec["scaleTargetRef"]["name"] == f"tidegate-worker-{queue}"
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (policy.min_workers,
                                                                      policy.max_workers)
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert not any(k in meta for k in ("password", "username")), "secrets in a file"


def test_redis_sums_every_priority_list():
    for queue, doc in objects("scaledobjects-redis.yaml").items():
        triggers = doc["spec"]["triggers"]
        lists = {t["name"]: t["metadata"]["listName"] for t in triggers}
        assert lists == {"p0": queue, "p3": f"{queue}:3", "p6": f"{queue}:6",
                         "p9": f"{queue}:9"}
        modifiers = doc["spec"]["advanced"]["scalingModifiers"]
        assert modifiers["formula"].replace(" ", "") == "p0+p3+p6+p9"
        assert (modifiers["target"], modifiers["metricType"]) == (TARGET, "AverageValue")


def test_rabbitmq_and_sqs_count_what_is_being_worked_on():
    for doc in objects("scaledobjects-rabbitmq.yaml").values():
        meta = doc["spec"]["triggers"][0]["metadata"]
        assert (meta["mode"], meta["protocol"], meta["value"]) == ("QueueLength", "http", TARGET)
    for queue, doc in objects("scaledobjects-sqs.yaml").items():
        meta = doc["spec"]["triggers"][0]["metadata"]
        assert meta["scaleOnInFlight"] == "true"
        assert meta["queueURL"].endswith("/" + queue.replace(".", "-"))
        assert meta["queueLength"] == TARGET


def test_prometheus_variant_copies_desired_workers():
    exported = {name for name, _, _ in QUEUE_GAUGES}
    for queue, doc in objects("scaledobjects-prometheus.yaml").items():
        trigger = doc["spec"]["triggers"][0]
        assert trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["threshold"] == "1"
        assert trigger["metadata"]["query"] == f'max(tidegate_desired_workers{{queue="{queue}"}})'
        assert "tidegate_desired_workers" in exported


def test_prometheus_scrapes_the_exporter():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["tidegate-exporter"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["exporter:9808"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "tidegate-alerts.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    assert "tidegate_breaker_state" in exprs and "tidegate_cluster_sheds_total" in exprs
