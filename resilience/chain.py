"""One chain of layers: each pattern's executor wraps the next, composed by listing them.

A layer is an object with ``call(next, c)`` (and ``acall(next, c)`` for asyncio): it does its
part and calls ``next(c)`` - the rest of the chain - at most as often as its pattern says
(a retry layer calls it again, a rate limiter may not call it at all). ``c`` is the
:class:`Call`: the function, its arguments, and what the layers need to know about it.
:class:`Chain` nests the layers once, outermost first, so a call is a walk down prebuilt
closures with no dispatch in between::

    chain = Chain([FallbackLayer(...), RetryLayer(...), BreakerLayer(...)])
    chain.call(fetch, "sku-1")

The built-in layers are :class:`Compiled`: besides ``call`` they have ``wrap(next)``, which
returns the layer's closure around ``next``; the chain calls it once, at construction, and a
call runs those closures (``call(next, c)`` is ``wrap(next)(c)``: the same code, built per
call). They read the call by index, as a plain tuple in :class:`Call`'s field order, which
is how the chain carries it (a named tuple costs several times as much to build, and a
deadline layer builds one per call); a layer of your own gets it as a :class:`Call`.

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

from .clock import Clock
from .deadline import Deadline, _current, as_deadline
from .shedding import Priority

__all__ = ["Call", "Chain", "Compiled", "Layer", "call_deadline", "new_call"]

T = TypeVar("T")


class Call(NamedTuple):
    """One guarded call as it travels down the chain. Immutable: a retry layer passes
    ``c._replace(attempt=n)`` (by index: ``(*c[:6], n, c[7])``) to the attempts after the
    first. The chain carries it as a plain tuple in this field order; layers of your own get
    it as this named tuple (see the module docstring).
    """

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = MappingProxyType({})
    key: str | None = None  # idempotency key: a keyed call may be retried
    priority: Priority = Priority.HIGH
    client: str | None = None  # keys the rate limit
    attempt: int = 1
    # the call's deadline, set by a deadline layer, published once: an ``(expires_at, clock)``
    # pair (a Deadline is one; a deadline layer stores a plain pair, see call_deadline)
    deadline: tuple[float, Clock] | None = None


def new_call(fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], key: str | None,
             priority: Priority, client: str | None) -> tuple:
    """A call as the chain carries it: a plain tuple in :class:`Call`'s field order."""
    return (fn, args, kwargs, key, priority, client, 1, None)


def call_deadline(c: tuple) -> Deadline | None:
    """The call's deadline as a :class:`~resilience.deadline.Deadline` (None when unset)."""
    return as_deadline(c[7])


_tuple_new = tuple.__new__
_get, _set, _reset = _current.get, _current.set, _current.reset


@runtime_checkable
class Layer(Protocol):
    """One pattern's executor."""

    def call(self, next: Callable[[Call], Any], c: Call) -> Any: ...

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any: ...


class Compiled:
    """A built-in layer: ``wrap(next)`` returns its closure around ``next``, built once by
    :class:`Chain`; ``call(next, c)`` runs the same closure built for one call.

    ``sets_deadline`` / ``publishes_deadline`` tell the chain's end whether it must publish
    the call's deadline itself (only when a deadline layer sits below every timeout layer).
    """

    sets_deadline = False
    publishes_deadline = False

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        raise NotImplementedError

    def call(self, next: Callable[[tuple], Any], c: tuple) -> Any:
        return self.wrap(next)(c)


def invoke(c: tuple) -> Any:
    """The end of a sync chain where a timeout layer has published the deadline (or none
    was set): the guarded function itself."""
    if c[2]:
        return c[0](*c[1], **c[2])  # c.fn(*c.args, **c.kwargs), without three lookups
    return c[0](*c[1])


def invoke_publishing(c: tuple) -> Any:
    """The end of a sync chain with a deadline layer below its timeout layers (or without
    any): the guarded function, under the call's deadline if it is the tighter one."""
    d = c[7]
    if d is not None:
        outer = _get()
        if outer is None or d[0] < outer[0]:
            token = _set(d)
            try:
                return c[0](*c[1], **c[2])
            finally:
                _reset(token)
    return c[0](*c[1], **c[2])


async def ainvoke(c: tuple) -> Any:
    return await c[0](*c[1], **c[2])


def _foreign(call: Callable[..., Any], next: Callable[[tuple], Any], c: tuple) -> Any:
    """A layer of the user's own: it gets the call as a :class:`Call`."""
    return call(next, c if type(c) is Call else _tuple_new(Call, c))


async def _aforeign(acall: Callable[..., Any], next: Callable[[tuple], Any], c: tuple) -> Any:
    return await acall(next, c if type(c) is Call else _tuple_new(Call, c))


def _must_publish(layers: tuple) -> bool:
    """Whether the chain's end must publish ``c.deadline``: some layer below the innermost
    timeout layer may set it (a deadline layer, or a layer of the user's own)."""
    for layer in reversed(layers):
        if getattr(layer, "publishes_deadline", False):
            return False
        if not isinstance(layer, Compiled) or layer.sets_deadline:
            return True
    return False


class Chain:
    """Layers composed outermost first; ``run(c)`` / ``arun(c)`` walk them."""

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers = tuple(layers)
        run: Callable[[tuple], Any] = invoke_publishing if _must_publish(self.layers) \
            else invoke
        arun: Callable[[tuple], Awaitable[Any]] = ainvoke
        for layer in reversed(self.layers):
            if isinstance(layer, Compiled):
                run = layer.wrap(run)
                arun = functools.partial(layer.acall, arun)
            else:
                run = functools.partial(_foreign, layer.call, run)
                arun = functools.partial(_aforeign, layer.acall, arun)
        self.run = run
        self.arun = arun

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` through the layers."""
        return self.run((fn, args, kwargs, None, Priority.HIGH, None, 1, None))

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return await self.arun((fn, args, kwargs, None, Priority.HIGH, None, 1, None))

    def __repr__(self) -> str:
        return " > ".join(type(layer).__name__ for layer in self.layers) or "Chain()"
