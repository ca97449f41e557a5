"""One chain of layers: each pattern's executor wraps the next, composed by listing them.

A layer is an object with ``call(next, c)`` (and ``acall(next, c)`` for asyncio): it does its
part and calls ``next(c)`` - the rest of the chain - at most as often as its pattern says
(a retry layer calls it again, a rate limiter may not call it at all). ``c`` is the
:class:`Call`: the function, its arguments, and what the layers need to know about it.
:class:`Chain` nests the layers once, outermost first, so a call is a walk down prebuilt
closures with no dispatch in between::

    chain = Chain([FallbackLayer(...), RetryLayer(...), BreakerLayer(...)])
    chain.call(fetch, "sku-1")

:class:`~resilience.policy.Policy` builds its chain from the policy file through one list,
:data:`resilience.policy.DEFAULT_LAYERS` (the order below); any subset or order can be built
in code. The layers live in :mod:`resilience.layers`.

    RateLimit > Shedding > Fallback > Deadline > Retry > Hedge > Breaker > Bulkhead | AdaptiveLimit
        > Timeout > call
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from .deadline import Deadline, _current
from .shedding import Priority

__all__ = ["Call", "Chain", "Layer", "new_call"]

T = TypeVar("T")


class Call(NamedTuple):
    """One guarded call as it travels down the chain. Immutable: a retry layer passes
    ``c._replace(attempt=n)`` to the attempts after the first.

    A named tuple because every guarded call builds one: :func:`new_call` builds it in one C
    call (a class with ``__init__`` costs several times as much on the success path).
    """

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = MappingProxyType({})
    key: str | None = None  # idempotency key: a keyed call may be retried
    priority: Priority = Priority.HIGH
    client: str | None = None  # keys the rate limit
    attempt: int = 1
    deadline: Deadline | None = None  # the call's, set by a deadline layer, published once


def new_call(fn: Callable[..., Any], args: tuple, kwargs: dict, key: str | None,
             priority: Priority, client: str | None) -> Call:
    """``Call(fn, args, kwargs, key, priority, client)`` for the hot path (no keyword
    handling; callers inline ``_tuple_new(Call, (...))``)."""
    return _tuple_new(Call, (fn, args, kwargs, key, priority, client, 1, None))


_tuple_new = tuple.__new__
_get, _set, _reset = _current.get, _current.set, _current.reset


@runtime_checkable
class Layer(Protocol):
    """One pattern's executor."""

    def call(self, next: Callable[[Call], Any], c: Call) -> Any: ...

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any: ...


def invoke(c: Call) -> Any:
    """The end of every sync chain: the guarded function itself, under the call's deadline
    if no layer has published it (or a tighter one) yet."""
    d = c.deadline
    if d is not None:
        outer = _get()
        if outer is None or d.expires_at < outer.expires_at:
            token = _set(d)
            try:
                return c[0](*c[1], **c[2])
            finally:
                _reset(token)
    return c[0](*c[1], **c[2])  # c.fn(*c.args, **c.kwargs), without three lookups


async def ainvoke(c: Call) -> Any:
    return await c.fn(*c.args, **c.kwargs)


class Chain:
    """Layers composed outermost first; ``run(c)`` / ``arun(c)`` walk them."""

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers = tuple(layers)
        run: Callable[[Call], Any] = invoke
        arun: Callable[[Call], Awaitable[Any]] = ainvoke
        for layer in reversed(self.layers):
            run = functools.partial(layer.call, run)
            arun = functools.partial(layer.acall, arun)
        self.run = run
        self.arun = arun

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` through the layers."""
        return self.run(new_call(fn, args, kwargs, None, Priority.HIGH, None))

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return await self.arun(new_call(fn, args, kwargs, None, Priority.HIGH, None))

    def __repr__(self) -> str:
        return " > ".join(type(layer).__name__ for layer in self.layers) or "Chain()"
