"""Log lines for the events worth a human's attention: a subscriber, as the metrics are."""

from __future__ import annotations

import logging

from . import events as ev

__all__ = ["on_event", "subscribe"]

log = logging.getLogger("resilience")


def on_event(event: ev.Event) -> None:
    if isinstance(event, ev.StateTransition):
        if event.from_state is not None:
            log.info("breaker %s: %s -> %s", event.dependency, event.from_state, event.to_state)
    elif isinstance(event, ev.StoreDegraded):
        if event.degraded:
            log.warning("state store %s unreachable (%s); using local state",
                        event.store, event.detail)
        elif event.detail:  # a recovery (the first report of a new store has no detail)
            log.warning("state store %s %s", event.store, event.detail)
    elif isinstance(event, ev.RetryScheduled):
        log.debug("%s: attempt %d failed (%s); retrying in %.3fs",
                  event.dependency, event.attempt, event.error, event.wait)


def subscribe(bus: ev.EventBus = ev.EVENTS):
    """Log from ``bus``; returns the unsubscribe function."""
    return bus.subscribe(on_event, ev.StateTransition, ev.StoreDegraded, ev.RetryScheduled)
