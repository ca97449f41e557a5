# ruff: noqa: F811  (pytest fixtures imported from _orphans are parameters here)
"""Kill drill: a worker holding long tasks is SIGKILLed under a mixed load, on Redis and SQS.

The worker holds 3 x ``TIDEGATE_DRILL_SCALE`` tasks of each kind (unkeyed charges, keyed
charges, index jobs), each a 60-second call, while short email jobs flow through another
worker. Default liveness settings, default visibility timeout. Proves: every task the dead
worker held is back within 30 s (printed: run with ``-s``), the idempotent ones run once more
and complete once, the unkeyed charges end in the DLQ as ``outcome_unknown``, none is lost.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import tidegate_env
from tests.integration._orphans import (  # noqa: F401  (fixtures)
    LONG_LIMITS,
    app_on,
    check_outcome,
    long_policy,
    run_worker_loss,
    target,
)
from tests.support.procs import Worker

pytestmark = [pytest.mark.integration, pytest.mark.drill]
SCALE = float(os.environ.get("TIDEGATE_DRILL_SCALE", "1"))
TARGET_S = 30.0


def test_kill_a_worker_holding_long_tasks(target, sims, state_redis, long_policy, app_on,
                                          tmp_path):
    env = tidegate_env(target.broker, long_policy, **LONG_LIMITS, **target.env)
    app = app_on(target)
    started: list[Worker] = []
    per_kind = max(1, round(3 * SCALE))
    try:
        outcome = run_worker_loss(env, app, sims, state_redis, tmp_path, started, tag="drill",
                                  per_kind=per_kind)
    finally:
        for w in started:
            w.stop()
    late = {tid: round(s, 1) for tid, s in outcome.back_after_s.items() if s >= TARGET_S}
    print("\n" + outcome.summary(f"kill drill, {target.broker.name}")
          + f"; target < {TARGET_S:.0f} s: {'met' if not late else f'MISSED for {late}'}")
    check_outcome(outcome, sims, app)
    assert outcome.dead and outcome.reruns
    assert max(outcome.back_after_s.values()) < 90  # loose on a loaded machine; printed above
