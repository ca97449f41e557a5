"""Deferred entries, queue specs and the replayer's slow start, without any server."""

from __future__ import annotations

import json

import pytest

from resilience.errors import ConfigError
from resilience.fallback import DeferredRequest
from workers.sqs_deferral import SqsClientConfig, SqsQueueSpec, decode_entry, encode_entry


def test_entry_round_trips():
    r = DeferredRequest("email", "email.send", ("a@x", "s"), {"body": "é"}, "k-1", 2,
                        "CircuitOpen: email", 1700000000.5, 3)
    assert decode_entry(encode_entry(r)) == r


@pytest.mark.parametrize("body, message", [
    ("{not json", "Expecting"),
    ("[]", "not a JSON object"),
    (json.dumps({"v": 99, "dependency": "email", "task": "t", "idempotency_key": "k"}),
     "unknown entry version"),
    (json.dumps({"v": 1, "dependency": "email", "task": "t"}), "lacks idempotency_key"),
    (json.dumps({"v": 1, "dependency": "email", "task": "t", "idempotency_key": "k",
                 "args": {}}), "args must be a list"),
])
def test_bad_entries_are_poison_with_a_reason(body, message):
    with pytest.raises(ValueError, match=message):
        decode_entry(body)


def test_entry_that_is_not_json_cannot_be_encoded():
    with pytest.raises(TypeError):
        encode_entry(DeferredRequest("email", "t", (object(),), idempotency_key="k"))


def test_queue_spec_names_and_checks():
    spec = SqsQueueSpec.named("email")
    assert (spec.queue, spec.dead_letter_queue) == ("tidegate-deferred-email",
                                                    "tidegate-deferred-email-dlq")
    url = "https://sqs.eu-west-1.amazonaws.com/123/q"
    assert SqsQueueSpec("email", url, url + "-dlq").queue == url
    with pytest.raises(ConfigError, match="not a legal SQS queue name"):
        SqsQueueSpec("email", "bad name!", "dlq")
    with pytest.raises(ConfigError, match="max_receive_count"):
        SqsQueueSpec.named("email", max_receive_count=0)
    with pytest.raises(ConfigError, match="retention"):
        SqsQueueSpec.named("email", retention_s=15 * 24 * 3600)


def test_client_config_refuses_unbounded_waits_and_hides_secrets():
    with pytest.raises(ConfigError, match="read_timeout"):
        SqsClientConfig(read_timeout=0)
    with pytest.raises(ConfigError, match="max_attempts"):
        SqsClientConfig(max_attempts=0)
    assert "s3cr3t" not in repr(SqsClientConfig(secret_access_key="s3cr3t"))


def test_settings_parse_queue_maps():
    from workers.settings import load_settings, parse_dependency_map

    assert parse_dependency_map(" email=https://x/q , search=name ") == {
        "email": "https://x/q", "search": "name"}
    with pytest.raises(ConfigError, match="TIDEGATE_DEFERRAL_QUEUES"):
        load_settings(deferral_queues="email")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_slow_start_ramps_and_resets():
    from workers.replayer import ReplayConfig, SlowStart

    clock = FakeClock()
    ramp = SlowStart(ReplayConfig(start_rate=10, ramp_factor=2, ramp_interval_s=1), clock)
    assert ramp.take(10) == (1, 0.0)  # the first grant is a single entry
    granted, wait = ramp.take(10)
    assert granted == 0 and wait == pytest.approx(0.1)
    clock.t += 0.5
    assert ramp.take(10)[0] == 7  # 0.5 s at 10 * 2**0.5 entries/s (the rate grows smoothly)
    clock.t += 2.5  # three intervals in: 80/s, bucket capped at one batch
    assert ramp.rate == pytest.approx(80)
    assert ramp.take(10)[0] == 10
    ramp.reset()
    assert ramp.rate == pytest.approx(10)


def test_slow_start_respects_max_rate():
    from workers.replayer import ReplayConfig, SlowStart

    clock = FakeClock()
    ramp = SlowStart(ReplayConfig(start_rate=10, max_rate=25), clock)
    clock.t += 10
    assert ramp.rate == 25


def test_replay_task_id_is_stable_per_key():
    from workers.replayer import replay_task_id

    assert replay_task_id("k") == replay_task_id("k") != replay_task_id("k2")
