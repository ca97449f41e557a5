"""Redis behind Sentinel: a redis-py client for the current master, from kombu's URL form.

URL (the form kombu's ``sentinel://`` broker transport reads, so one value serves both)::

    sentinel://[:password@]host:port[/db];sentinel://host:port;...[?master_name=NAME]

Each part names one sentinel; the password and database come from the first part, as in
kombu; ``master_name`` (default ``mymaster``) may sit on any part. The client asks the
sentinels for the master on each new connection, so after a failover its next command goes
to the promoted replica: connections to the old master fail, redis-py drops them, and the
store's local fallback answers in between.

Redis replication is asynchronous: a write the old master acknowledged just before it died
may be missing on the new one (docs/ha.md measures that window). ``wait_replicas`` is the
stronger mode: ``WAIT n timeout`` after the writes that must survive.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from resilience.errors import ConfigError

__all__ = ["DEFAULT_MASTER", "SentinelTarget", "is_sentinel_url", "parse_sentinel_url",
           "sentinel_client"]

DEFAULT_MASTER = "mymaster"


def is_sentinel_url(url: str) -> bool:
    return url.startswith("sentinel://")


class SentinelTarget:
    """What a sentinel URL names: the sentinels, the master's name, db and password."""

    __slots__ = ("db", "master", "password", "sentinels")

    def __init__(self, sentinels: list[tuple[str, int]], master: str, db: int,
                 password: str | None) -> None:
        self.sentinels, self.master, self.db, self.password = sentinels, master, db, password


def parse_sentinel_url(url: str) -> SentinelTarget:
    """A ConfigError naming the part that is wrong, else the target."""
    sentinels: list[tuple[str, int]] = []
    master, db, password = DEFAULT_MASTER, 0, None
    for i, part in enumerate(p for p in url.split(";") if p.strip()):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel":
            raise ConfigError(f"each part of a Sentinel URL must be sentinel://host:port, "
                              f"got {part!r}")
        try:
            host, port = parts.hostname, parts.port or 26379
        except ValueError:
            raise ConfigError(f"bad sentinel port in {part!r}") from None
        if not host:
            raise ConfigError(f"no sentinel host in {part!r}")
        sentinels.append((host, port))
        names = parse_qs(parts.query).get("master_name")
        if names:
            master = names[-1]
        if i == 0:
            path = parts.path.strip("/")
            if path and not path.isdigit():
                raise ConfigError(f"Sentinel URL database must be a number, got {path!r}")
            db = int(path or 0)
            password = unquote(parts.password) if parts.password else None
    if not sentinels:
        raise ConfigError("Sentinel URL names no sentinel (sentinel://host:port;...)")
    return SentinelTarget(sentinels, master, db, password)


def sentinel_client(url: str, *, socket_timeout: float, socket_connect_timeout: float,
                    **kwargs: Any) -> Any:
    """A ``redis.Redis`` bound to the master that the sentinels name (found per connection)."""
    from redis.sentinel import Sentinel

    target = parse_sentinel_url(url)
    timeouts = {"socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout}
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=dict(timeouts), **timeouts)
    return sentinel.master_for(target.master, db=target.db, password=target.password,
                               **timeouts, **kwargs)
