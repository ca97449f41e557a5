"""One adapter per broker, selected once from the broker URL's scheme.

Everything Tidegate does differently on Redis, RabbitMQ and SQS (priorities, connection and
publish options, depth probes, dead-letter storage, batch publishing, redelivery flag, worker
liveness) is answered by the broker's adapter (:class:`~workers.brokers.base.BrokerAdapter`);
the rest of the code asks ``broker_for(settings)`` and never compares transport names.
Adding a broker is one module here and one line in :data:`BROKERS`
(docs/architecture.md, "Adding a broker").
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from resilience.errors import ConfigError
from workers.brokers.base import BrokerAdapter
from workers.brokers.memory import MemoryBroker
from workers.brokers.rabbitmq import RabbitMQBroker
from workers.brokers.redis import RedisBroker
from workers.brokers.sqs import SQSBroker

if TYPE_CHECKING:
    from workers.settings import Settings

__all__ = ["BROKERS", "SCHEMES", "BrokerAdapter", "broker_for", "broker_named", "scheme_of"]

#: the registry: one adapter per broker family, keyed by its name (``Settings.transport``)
BROKERS: dict[str, BrokerAdapter] = {
    adapter.name: adapter
    for adapter in (RedisBroker(), RabbitMQBroker(), SQSBroker(), MemoryBroker())
}
_BY_SCHEME = {scheme: adapter for adapter in BROKERS.values() for scheme in adapter.schemes}
#: every broker URL scheme Tidegate accepts
SCHEMES = frozenset(_BY_SCHEME)


def scheme_of(url: str) -> str:
    """The URL's scheme as the registry reads it (``redis+socket`` is ``redis``)."""
    return urlsplit(url).scheme.split("+")[0]


def broker_for(settings_or_url: Settings | str) -> BrokerAdapter:
    """The adapter for a broker URL (or the settings' ``broker_url``)."""
    url = settings_or_url if isinstance(settings_or_url, str) else settings_or_url.broker_url
    scheme = scheme_of(url)
    try:
        return _BY_SCHEME[scheme]
    except KeyError:
        raise ConfigError(f"unsupported broker scheme {scheme!r}; use one of "
                          f"{', '.join(sorted(SCHEMES))}") from None


def broker_named(name: str) -> BrokerAdapter:
    """The adapter of a transport family (``Settings.transport``)."""
    try:
        return BROKERS[name]
    except KeyError:
        raise ConfigError(f"unknown transport {name!r}; one of {', '.join(BROKERS)}") from None
