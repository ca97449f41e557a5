"""Fault drill: one node of a three-node RabbitMQ cluster is SIGKILLed under steady mixed load,
once with the work queues as quorum queues and once as classic queues.

``scripts/services.sh rabbitmq-cluster`` starts three extra RabbitMQ nodes on free ports (own
node names, data, logs and Erlang cookie; the machine's default node on 5672 is never
touched) and joins them. Workers and producers get the three nodes as one failover list
(``amqp://n1/vh;amqp://n2/vh;amqp://n3/vh``: kombu tries them in turn). The queues are declared
through node 1, so node 1 holds the classic queues and the quorum queues' leaders, and the
worker and producer are connected to it: the node killed is the worst one to lose. Just before
the kill, index jobs are slowed and a burst of them enqueued, so node 1 holds a backlog.

* quorum: the queues' other two replicas elect a leader; the worker and producer reconnect to
  another node and carry on; every accepted (confirmed) job is served or dead-lettered (lost 0).
* classic: the queues live on node 1 alone; while it is down their jobs are out of reach
  (the drill counts them) and the queues cannot be consumed or published to from the other
  nodes; node 1 is then restarted from its disk and they come back. Had its disk been lost,
  those jobs would be lost.

About 3 minutes on a loaded 2-core machine (20-40 s of it starting the cluster): `make drills`
only (``TIDEGATE_DRILL_SCALE`` set), not `make test`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import STATE_REDIS_URL, Broker
from tests.support.load import MixedLoad, account, settled
from tests.support.procs import ROOT, free_port_block, wait_until
from tests.support.quorum import declared, quorum_policy
from tidegate.stack import ensure_vhost

SCALE = float(os.environ.get("TIDEGATE_DRILL_SCALE", "0") or 0)
pytestmark = [
    pytest.mark.integration, pytest.mark.drill, pytest.mark.serial, pytest.mark.timeout(900),
    pytest.mark.skipif(not SCALE, reason="about 3 minutes: `make drills` only "
                                         "(TIDEGATE_DRILL_SCALE set)"),
]
RATE = 20.0  # jobs/s: keyed charges, unkeyed charges, search.index in turn
QUEUES = ("payments", "search")
BURST = 60  # index jobs enqueued at once just before the kill


class RabbitCluster:
    """The three nodes ``scripts/services.sh rabbitmq-cluster`` started, and their CLI."""

    def __init__(self, tmp: Path) -> None:
        # AMQP on base..base+2, Erlang distribution on +20000
        self.base = free_port_block((0, 1, 2, 20000, 20001, 20002))
        self.dir, self.name = tmp, f"tgq{self.base}"
        self.env = {**os.environ, "RABBITMQ_CLUSTER_DIR": str(tmp),
                    "RABBITMQ_CLUSTER_PORT": str(self.base), "RABBITMQ_CLUSTER_NAME": self.name}

    def services(self, target: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "scripts" / "services.sh"), target], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=400)

    def ctl(self, node: int = 1) -> list[str]:
        """rabbitmqctl for ``node``, with the cluster's own cookie (its HOME)."""
        binary = next((p for p in ("/usr/lib/rabbitmq/bin/rabbitmqctl",) if Path(p).exists()),
                      "rabbitmqctl")
        return ["env", f"HOME={self.dir}", f"RABBITMQ_CONF_ENV_FILE={self.dir}/rabbitmq-env.conf",
                binary, "-n", f"{self.name}{node}@localhost"]

    def run(self, *args: str, node: int = 1) -> str:
        return subprocess.run([*self.ctl(node), "-q", *args], capture_output=True, text=True,
                              timeout=120, check=True).stdout

    def url(self, vhost: str) -> str:
        return ";".join(f"amqp://guest:guest@127.0.0.1:{self.base + i}/{vhost}" for i in range(3))

    def add_vhost(self, vhost: str) -> None:
        ensure_vhost(vhost, self.ctl(node=2), timeout=120)

    def kill(self, node: int) -> None:
        os.kill(int((self.dir / f"node{node}" / "pid").read_text().strip()), signal.SIGKILL)


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory) -> Iterator[RabbitCluster]:
    if not (shutil.which("rabbitmq-server") or Path("/usr/lib/rabbitmq/bin").exists()):
        pytest.skip("rabbitmq-server is not installed")
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    started = time.monotonic()
    out = cluster.services("rabbitmq-cluster")
    try:
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
        print(f"\nRabbitMQ cluster of 3 up in {time.monotonic() - started:.0f} s")
        yield cluster
    finally:
        cluster.services("rabbitmq-cluster-stop")  # the nodes its own start recorded


def _homes(cluster: RabbitCluster, vhost: str) -> dict[str, str]:
    """queue -> the node holding it (classic) or its leader (quorum)."""
    out = cluster.run("list_queues", "-p", vhost, "--no-table-headers", "name", "type", "leader",
                      "pid", node=2)
    homes = {}
    for line in out.splitlines():
        name, kind, leader, pid = [*line.split("\t"), "", "", ""][:4]
        homes[name] = leader if kind == "quorum" else pid.strip("<>").split(".")[0]
    return homes


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_a_node_killed_under_load(rabbit_cluster, queue_type, sims, policy_file, tmp_path,
                                  request, state_redis):
    from kombu import Connection

    from producers import Producer
    from workers.application import create_app
    from workers.installation import installation
    from workers.settings import load_settings

    c = rabbit_cluster
    out = c.services("rabbitmq-cluster")  # all three up (an earlier case killed node 1)
    assert out.returncode == 0, out.stderr
    vhost = f"drill_{queue_type}"
    c.add_vhost(vhost)
    policy = quorum_policy(policy_file, tmp_path / f"{queue_type}.toml", QUEUES, queue_type)
    url = c.url(vhost)
    settings = load_settings(broker_url=url, redis_url=STATE_REDIS_URL, policy_file=policy,
                             connect_timeout_s=1.0, rabbitmq_management_url=None)
    app = create_app(settings)
    with Connection(url.split(";")[0], connect_timeout=5) as conn:  # declared on node 1
        installation(app).topology.declare(conn)
    queues = declared(vhost, c.ctl(2))
    assert all(queues[q]["type"] == queue_type for q in QUEUES), queues
    homes = _homes(c, vhost)
    node1 = f"{c.name}1@localhost"
    assert all(homes[q] == node1 for q in QUEUES), homes

    broker = Broker("amqp", url)
    start_worker = request.getfixturevalue("start_worker_on")(broker)
    worker_env = {"TIDEGATE_POLICY_FILE": str(policy), "TIDEGATE_RABBITMQ_MANAGEMENT_URL": "",
                  "TIDEGATE_CONNECT_TIMEOUT_S": "1"}
    worker = start_worker("payments,search", concurrency=4, env=worker_env)
    load = MixedLoad(Producer(app), RATE, prefix=f"rq{queue_type}")
    outage: dict[str, float | int | bool] = {}
    try:
        with load:
            wait_until(lambda: len(load.accepted) >= 3 * RATE * SCALE, 120,
                       message="jobs before the kill")
            # a backlog on node 1 when it dies: index jobs slowed to 100 ms (the search
            # timeout is 160 ms), a burst of them on top of the steady load
            sims["search"].control(latency_ms=100)
            for i in range(BURST):
                job = f"rq{queue_type}-burst-{i}"
                load.producer.enqueue("search.index", [job])
                load.accepted[job] = ("index", time.time())
            killed_at = time.time()
            c.kill(1)
            if queue_type == "quorum":
                sims["search"].control(latency_ms=0)
                before = len(load.accepted)
                wait_until(lambda: len(load.accepted) >= before + 3 * RATE * SCALE, 120,
                           message="producers enqueueing again through another node")
            else:
                time.sleep(10 * SCALE)  # the outage: what can the cluster do without node 1?
                applied = _applied(sims)
                outage = {
                    "s": time.time() - killed_at,
                    "waiting": sum(1 for j, (_, t) in load.accepted.items()
                                   if t <= killed_at and j not in applied),
                    "accepted": sum(1 for _, t in load.accepted.values() if t > killed_at),
                    "served": sum(1 for j, (_, t) in load.accepted.items()
                                  if t > killed_at + 1 and j in applied),
                    "refused": len(load.refused),
                    "worker_alive": worker.alive(),
                }
                sims["search"].control(latency_ms=0)
                out = c.services("rabbitmq-cluster")  # node 1 back, from its own disk
                assert out.returncode == 0, out.stderr
                if not worker.alive():  # as its supervisor would
                    worker = start_worker("payments,search", concurrency=4, env=worker_env)
                revived_at = time.time()
                before = len(load.accepted)
                wait_until(lambda: len(load.accepted) >= before + 3 * RATE * SCALE, 120,
                           message="producers enqueueing again after node 1 came back")
        with contextlib.suppress(AssertionError):  # the accounting below says what is missing
            wait_until(lambda: settled(load, sims, app), 120 if queue_type == "quorum" else 60,
                       interval=1.0, message="every accepted job served or dead-lettered")
        result = account(load, sims, app)
    finally:
        app.close()
    when = {job: t for job, (_, t) in load.accepted.items()}
    lost_before = [j for j in result.lost if when[j] <= killed_at]
    print(f"\n{queue_type} queues, node 1 killed: {result.line()}; lost of those accepted "
          f"before the kill {len(lost_before)}")
    assert not result.doubled, result.doubled
    if queue_type == "quorum":
        from tests.support.load import applications, job_of

        resumed = min((a["applied_at"] for a in applications(sims)
                       if when.get(job_of(a) or "", 0) > killed_at), default=float("inf"))
        print(f"quorum: the first job accepted after the kill was served "
              f"{resumed - killed_at:.1f} s after it")
        # every job the broker confirmed is served or dead-lettered, through the other nodes,
        # by the same worker and producer
        assert not result.lost, (result.lost, killed_at)
        assert worker.alive(), worker.output()[-3000:]
        assert any(t > killed_at + 1 for t in when.values())
        return
    lost_down = [j for j in result.lost if killed_at < when[j] <= revived_at]
    print(f"classic queues while node 1 was down ({outage['s']:.0f} s): "
          f"{outage['waiting']} jobs accepted before the kill out of reach, "
          f"{outage['accepted']} accepted meanwhile ({outage['served']} of those accepted 1 s "
          f"after the kill or later served then, "
          f"{len(lost_down)} never), {outage['refused']} enqueues refused; the worker "
          f"{'carried on' if outage['worker_alive'] else 'exited (queue home node down)'}")
    # The queued jobs come back with their node (its disk kept them); what the cluster
    # confirmed for the dead node's queues meanwhile is gone.
    assert not lost_before, lost_before
    assert outage["waiting"] and not outage["served"], outage


def _applied(sims) -> set[str]:
    from tests.support.load import applications, job_of

    return {job_of(a) or "" for a in applications(sims)}
