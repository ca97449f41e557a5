"""The policy file's schema: parsed once, frozen, every section checked by every loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from resilience.errors import ConfigError
from workers.autoscale import load_scaling_policies
from workers.policy_file import DEFAULT_TASK_MODULES, PolicyFileError, load_policy_file
from workers.settings import DEFAULT_POLICY_FILE
from workers.topology import load_topology

SHIPPED = DEFAULT_POLICY_FILE.read_text()


def test_shipped_file_loads_once_and_is_frozen():
    parsed = load_policy_file(DEFAULT_POLICY_FILE)
    assert load_policy_file(DEFAULT_POLICY_FILE) is parsed  # parsed once per file version
    assert parsed.include == DEFAULT_TASK_MODULES  # [app] include left out
    assert parsed.configs["payments"].timeout == 0.08
    with pytest.raises(ValidationError):
        parsed.schema.dependencies["payments"].timeout_ms = 1  # type: ignore[misc]


def test_app_include_declares_task_modules(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text(SHIPPED + '\n[app]\ninclude = ["shop.tasks", "shop.more_tasks"]\n')
    assert load_policy_file(path).include == ("shop.tasks", "shop.more_tasks")


def test_every_loader_checks_the_whole_file(tmp_path: Path):
    """A watermark or autoscaling mistake stops the topology's readers too (the worker, the
    CLI), not only the producer that reads [backpressure]."""
    path = tmp_path / "p.toml"
    path.write_text(SHIPPED + "\n[backpressure.search]\nlow_watermark = 900\nhigh_watermark = 5\n")
    with pytest.raises(PolicyFileError, match=r"\[backpressure.search\]: high_watermark") as err:
        load_topology(path)
    assert isinstance(err.value, ConfigError) and len(err.value.errors) == 1
    with pytest.raises(ConfigError, match="high_watermark"):
        load_scaling_policies(path)


def test_errors_are_all_reported(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text(SHIPPED.replace("timeout_ms = 80 ", "timout_ms = 80 ", 1)
                    + "\n[autoscalling]\nx = 1\n")
    with pytest.raises(PolicyFileError) as err:
        load_policy_file(path)
    assert err.value.errors == (
        "[dependencies.payments.timout_ms]: unknown key; did you mean 'timeout_ms'?",
        "[autoscalling]: unknown section; did you mean 'autoscaling'?",
    )
    assert "\n" not in str(err.value)


def test_unknown_dependency_names_the_one_meant():
    topology = load_topology(DEFAULT_POLICY_FILE)
    with pytest.raises(ConfigError, match="unknown dependency 'paymnts'; did you mean 'payments'"):
        topology.dependency("paymnts")
    with pytest.raises(ConfigError, match="unknown queue 'serch'; did you mean 'search'"):
        topology.check_queue("serch")


def test_queue_type_per_queue_with_a_default(tmp_path: Path):
    """``[queues] queue_type`` for every queue, ``[queues.Q]`` overrides; a quorum queue and
    its DLQ are declared quorum, without x-max-priority, dead-lettering at least once."""
    path = tmp_path / "p.toml"
    path.write_text(SHIPPED + '\n[queues]\nqueue_type = "quorum"\n'
                    '[queues.default]\nqueue_type = "classic"\n')
    topology = load_topology(path)
    assert [topology.queue_type(q) for q in topology.work_queues] == [
        "quorum", "quorum", "quorum", "classic"]
    args = {q.name: q.queue_arguments for q in topology.kombu_queues()}
    assert args["payments"] == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "tidegate.dlx",
        "x-dead-letter-routing-key": "payments.dlq", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish"}
    assert args["default"]["x-max-priority"] == 9 and "x-queue-type" not in args["default"]
    dlqs = {q.name: q.queue_arguments for q in topology.dead_letter_kombu_queues()}
    assert dlqs["payments.dlq"] == {"x-queue-type": "quorum"} and not dlqs["default.dlq"]
    assert topology.quorum and not load_topology(DEFAULT_POLICY_FILE).quorum


def test_queue_type_errors(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text(SHIPPED + '\n[queues]\nqueu_type = "quorum"\n'
                    '[queues.search]\nqueue_type = "quorom"\n')
    with pytest.raises(PolicyFileError) as err:
        load_policy_file(path)
    assert err.value.errors == (
        "[queues.queu_type]: unknown key; did you mean 'queue_type'?",
        "[queues.search.queue_type]: input should be 'classic' or 'quorum', got 'quorom'",
    )
    path.write_text(SHIPPED + '\n[queues.serch]\nqueue_type = "quorum"\n')
    with pytest.raises(PolicyFileError, match=r"\[queues.serch\]: unknown queue; did you mean "
                                              "'search'"):
        load_policy_file(path)
