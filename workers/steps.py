"""The steps a task body calls (``self.read`` / ``self.write`` / ``self.optional``).

Each step runs one downstream call through its dependency's chain and, when the chain gives
up, decides which fallback may answer for it: a read takes the cached or default value, an
optional step the graceful answer, a write is queued for later where configured (refused
before calling, or idempotent work on its last attempt). Anything else reaches the task's
outcome decision (``workers.outcomes``). The chains are built without their fallback
(``workers.policies``) because only here is it known what kind of step failed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from resilience.errors import InProgress, PermanentError, RejectedError, TransientError
from resilience.fallback import CallContext, DeferralError, Graceful, NoFallback, QueueForLater
from resilience.retry import attempts_allowed
from workers.execution import Execution
from workers.policies import state_for

if TYPE_CHECKING:
    from workers.resilient import ResilientTask

log = logging.getLogger("tidegate.worker")

__all__ = ["RETRYABLE", "step"]

#: what a step may fall back from, and a delivery may retry after (anything else is a bug)
RETRYABLE = (TransientError, OSError, TimeoutError)


def step(task: ResilientTask, dependency: str, fn: Callable[..., Any], args: tuple,
         kwargs: dict, *, kind: str, message: str | None = None) -> Any:
    """One call of ``kind`` ("read", "write" or "optional") on ``dependency``."""
    ex = task.execution
    state = state_for(task.app)
    policy = state.policy(dependency)
    fallback = state.fallback_for(dependency)
    name = f"{dependency}:{getattr(fn, '__name__', 'call')}"

    def invoked() -> Any:
        attempted = ex.effect_attempted
        if kind != "read":
            ex.effect_attempted = True
        try:
            return fn(*args, **kwargs)
        except InProgress:
            # The provider refused this request: an earlier one with the same key is still
            # running there. This one applied nothing; a later try with the same key gets
            # the first one's outcome (never a second effect).
            ex.effect_attempted = attempted
            raise

    invoked.name = name  # type: ignore[attr-defined]  (the chain labels calls by it)
    ctx = CallContext(dependency, name, args, kwargs, ex.idempotency_key, int(ex.priority))
    # the task's own dependency: its in-call attempts spend the job's attempts
    share = attempts_allowed(ex.attempts_left) if dependency == task.dependency \
        else contextlib.nullcontext()
    try:
        with share as allowance:
            try:
                result = policy.call(invoked, idempotency_key=ex.idempotency_key,
                                     priority=ex.priority)
            finally:
                if allowance is not None:
                    ex.calls = max(ex.calls, allowance.made)
    except PermanentError:
        raise
    except RETRYABLE as exc:
        return _fall_back(ex, dependency, kind, fallback, ctx, exc, message)
    if kind == "read" and fallback is not None:
        fallback.on_success(ctx, result)
    return result


def _fall_back(ex: Execution, dependency: str, kind: str, fallback: Any,
               ctx: CallContext, exc: BaseException, message: str | None) -> Any:
    if kind == "read" and fallback is not None and fallback.kind in ("cached", "default"):
        try:
            value = fallback.recover(ctx, exc)
        except NoFallback:
            raise exc from None
        ex.fallbacks.append(f"{dependency}:{fallback.kind}")
        log.warning("%s[%s]: %s unavailable (%s); served the %s fallback", ex.task,
                    ex.task_id, dependency, exc, fallback.kind)
        return value
    if kind == "optional":
        ex.fallbacks.append(f"{dependency}:graceful")
        log.warning("%s[%s]: optional step on %s failed gracefully: %s", ex.task, ex.task_id,
                    dependency, exc)
        # the task's own words for a step it can do without, whatever the outcome
        return Graceful(message, message).recover(ctx, exc)
    refused = isinstance(exc, RejectedError)
    if kind == "write" and isinstance(fallback, QueueForLater) and (
        refused or (ex.idempotent and ex.last_attempt)
    ):
        whole = CallContext(dependency, ex.task, tuple(ex.args), dict(ex.kwargs),
                            ex.idempotency_key or ex.task_id, int(ex.priority))
        try:
            deferred = fallback.recover(whole, exc)
        except DeferralError as err:
            log.error("%s[%s]: queue-for-later failed (%s); normal failure path", ex.task,
                      ex.task_id, err)
            raise exc from None
        except NoFallback as err:  # deferred too often already: retry, then dead-letter
            log.warning("%s[%s]: not queued for later: %s; normal failure path", ex.task,
                        ex.task_id, err)
            raise exc from None
        ex.fallbacks.append(f"{dependency}:queue")
        return deferred
    raise exc
