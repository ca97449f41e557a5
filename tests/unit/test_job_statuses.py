"""workers.jobs: the one SET per state, and a Redis that is away costs one try per pause."""

from __future__ import annotations

import json

import pytest

from workers.jobs import PAUSE_S, JobStatuses, job_key


class Client:
    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.down = False

    def execute_command(self, *command):
        if self.down:
            raise ConnectionError("redis away")
        self.sent.append(command)


def test_one_set_per_state_with_ttl_and_condition():
    client = Client()
    jobs = JobStatuses(client, ttl_s=60)
    jobs.write("j1", "queued", only_if="NX", task="t", queue="q", reason=None)
    jobs.write(None, "running")  # no id: nothing to record
    [(verb, key, doc, px, ttl, cond)] = client.sent
    assert (verb, key, px, ttl, cond) == ("SET", job_key("j1"), "PX", 60_000, "NX")
    body = json.loads(doc)
    assert (body["state"], body["task"], body["queue"]) == ("queued", "t", "q")
    assert "reason" not in body  # None fields are left out


def test_a_failed_write_pauses_writes_instead_of_failing_each_job():
    now = [100.0]
    client = Client()
    jobs = JobStatuses(client, ttl_s=60, clock=lambda: now[0])
    client.down = True
    jobs.write("a", "running")  # raises inside: logged, never to the caller
    client.down = False
    jobs.write("b", "running")
    assert client.sent == [] and jobs.skipped == 1
    now[0] += PAUSE_S + 0.01
    jobs.write("c", "running")
    assert [c[1] for c in client.sent] == [job_key("c")]


@pytest.mark.parametrize("state", ["dead_lettered", "deferred"])
def test_fields_travel_as_json(state):
    client = Client()
    JobStatuses(client, ttl_s=1).write("x", state, reason="r", record="id", error="e" * 10)
    assert json.loads(client.sent[0][2])["reason"] == "r"
