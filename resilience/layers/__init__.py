"""The chain's layers: one executor per pattern, each ``call(next, c)`` / ``acall(next, c)``.

Outermost first, as :data:`resilience.policy.DEFAULT_LAYERS` lists them:

=============  =====================  =========================================================
layer          module                 wraps ``next`` with
=============  =====================  =========================================================
rate limit     :mod:`.admission`      a GCRA permit per client (:mod:`resilience.ratelimit`)
shedding       :mod:`.admission`      admission by priority under load (:mod:`~.shedding`)
fallback       :mod:`.fallback`       a stand-in answer for a transient failure
deadline       :mod:`.deadline`       the call's total budget, published to the callee
retry          :mod:`.retry`          attempts 2..n on tenacity (attempt 1 runs inline)
hedge          :mod:`.hedge`          parallel attempts after a delay, first success wins
breaker        :mod:`.breaker`        a breaker permit; times every attempt
bulkhead       :mod:`.bulkhead`       a concurrency slot
adaptive       :mod:`.adaptive`       a slot under a limit learnt from latency (instead of bulkhead)
timeout        :mod:`.timeout`        the attempt's budget; a late answer is a timeout
=============  =====================  =========================================================

The patterns' state (breakers, limiters, budgets) lives in their own modules and stores; a
layer only decides where in a call that state is consulted.
"""

from .adaptive import AdaptiveLimitLayer
from .admission import RateLimitLayer, SheddingLayer
from .breaker import BreakerLayer
from .bulkhead import BulkheadLayer
from .deadline import DeadlineLayer
from .fallback import FallbackLayer, task_name
from .hedge import HedgeLayer
from .retry import RetryLayer
from .timeout import TimeoutLayer

__all__ = [
    "AdaptiveLimitLayer",
    "BreakerLayer",
    "BulkheadLayer",
    "DeadlineLayer",
    "FallbackLayer",
    "HedgeLayer",
    "RateLimitLayer",
    "RetryLayer",
    "SheddingLayer",
    "TimeoutLayer",
    "task_name",
]
