"""The counters behind bench/state_load.py and docs/scaling.md count what they claim: a Redis
server's commands split into sent and run-in-scripts, and AMQP frames by method."""

from __future__ import annotations

import uuid
from pathlib import Path

from kombu import Connection, Queue

from bench.state_load import AmqpCounter, RedisServer, amqp_round_trips, measuring
from tidegate.stack import wait_until


def test_redis_counts_sent_and_script_commands(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "count")
    try:
        server.client.ping()  # a new connection's own commands (CLIENT SETINFO) come first
        with measuring(server) as counts:
            server.client.set("a", 1)
            server.client.eval("redis.call('incr', KEYS[1]); return redis.call('incr', KEYS[1])",
                               1, "a")
        c = counts["count"]
        assert (c.client, c.script) == (2, 2)  # SET and EVAL sent; two INCRs inside it
        assert c.calls == {"set": 1, "eval": 1, "incr": 2}
        # the bytes of those two requests and replies, not of the snapshots or MONITOR
        assert 60 < c.bytes_in < 200 and 5 < c.bytes_out < 40, c
    finally:
        server.close()


def test_amqp_counter_counts_a_confirmed_publish(rabbitmq_up: str) -> None:
    counter = AmqpCounter("amqp")
    name = f"capacity-count-{uuid.uuid4().hex[:8]}"
    url = rabbitmq_up.replace(":5672/", f":{counter.port}/")
    try:
        with Connection(url, connect_timeout=5,
                        transport_options={"confirm_publish": True}) as conn:
            queue = Queue(name, auto_delete=False, durable=False)
            producer = conn.Producer()
            queue(conn.default_channel).declare()
            producer.publish({"n": 0}, routing_key=name)  # the channel's confirm.select first
            counter.start()
            producer.publish({"n": 1}, routing_key=name)
            wait_until(lambda: counter._snap().calls["s>basic.ack"]
                       - counter._mark.calls["s>basic.ack"] >= 1, 5, message="the confirm")
            c = counter.stop()
            queue(conn.default_channel).delete()
        assert c.calls == {"c>basic.publish": 1, "c>header": 1, "c>body": 1, "s>basic.ack": 1}
        assert amqp_round_trips(c) == 1  # the publish waited for its confirm
    finally:
        counter.close()
