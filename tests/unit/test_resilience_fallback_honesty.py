"""A graceful fallback states only what is known (the seed's "not charged" is a promise)."""

import pytest

from resilience.clock import FakeClock
from resilience.errors import (
    AttemptTimeout,
    BulkheadFull,
    CircuitOpen,
    InProgress,
    RateLimited,
    Shed,
    TransientError,
)
from resilience.fallback import CallContext, Graceful, Unavailable
from resilience.policy import Policy, PolicyConfig
from resilience.policy_config import FallbackSpec

CTX = CallContext("payments", "charge", (), {}, None, 2)
NOT = "Payments are temporarily unavailable; you have not been charged."


@pytest.mark.parametrize("error", [CircuitOpen(), BulkheadFull(), RateLimited(), Shed()])
def test_refused_before_any_attempt_is_not_charged(error):
    answer = Graceful(NOT).recover(CTX, error)
    assert answer.outcome == "not_attempted" and answer.message == NOT


@pytest.mark.parametrize("error", [AttemptTimeout(), TransientError("503"), InProgress(),
                                   ConnectionError()])
def test_an_attempt_that_reached_it_is_outcome_unknown(error):
    answer = Graceful(NOT, "we will confirm").recover(CTX, error)
    assert answer.outcome == "unknown" and answer.message == "we will confirm"
    default = Graceful(NOT).recover(CTX, error)
    assert "not charged" not in default.message and "unknown" in default.message


def test_a_refused_retry_after_a_timeout_is_outcome_unknown():
    clock = FakeClock()
    p = Policy(PolicyConfig(name="payments", fallback=FallbackSpec(kind="graceful",
                                                                  message=NOT)), clock=clock)
    calls = []

    def charge():
        calls.append(1)
        if len(calls) == 1:
            p.breaker.force_open(30)  # the circuit opens meanwhile
            raise TimeoutError("read timed out")  # reached the provider, maybe charged
        raise AssertionError("not called: the breaker refuses attempt 2")

    answer = p.call(charge, idempotency_key="k")  # keyed: attempt 2 is allowed
    assert len(calls) == 1  # attempt 2 was refused by the open circuit...
    assert isinstance(answer, Unavailable)  # ...which does not make attempt 1 harmless
    assert answer.outcome == "unknown" and answer.message != NOT
