"""The Celery configuration Tidegate installs, and the shipped example app built with it.

``celery -A workers worker -Q payments`` runs the example (``workers.app``, built on first
use); :func:`workers.install` applies the same configuration to your own app. Configured for
the way Tidegate promises work is delivered: JSON only (pickle is refused on both ends),
prefetch 1 so a worker pulls one task at a time at its own pace, late ack decided
per task (idempotent work only, see ``workers.resilient``), bounded time limits as the outer
timeout backstop, and a broker connection that gives up after the connect timeout instead of
hanging. The same app runs unchanged on Redis, RabbitMQ and SQS URLs.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from workers.installation import install
from workers.policy_file import DEFAULT_TASK_MODULES, load_policy_file
from workers.settings import Settings, get_settings
from workers.startup import exit_on_config_error
from workers.topology import REDIS_PRIORITY_STEPS, Topology

TASK_MODULES = DEFAULT_TASK_MODULES  # the policy file's ``[app] include`` when left out


def transport_options(settings: Settings) -> dict[str, Any]:
    """Per-transport options; each bounds every wait it can."""
    connect, read = settings.connect_timeout_s, settings.read_timeout_s
    if settings.transport == "redis":
        return {
            # The visibility timeout must exceed the longest task's hard limit, or Redis
            # redelivers a task that is still running (Settings.check enforces it).
            "visibility_timeout": settings.visibility_timeout_s,
            # How soon a killed worker's unacked tasks come back: kombu sweeps every
            # interval x throttle seconds (100 s by default); keep it a fraction of the
            # visibility timeout so a short timeout is not stretched by the sweep.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1 if settings.visibility_timeout_s < 600 else 10,
            # kombu's own priority layout and separator (REDIS_SEP), nothing else: stock
            # clients (Flower, `celery --broker=URL inspect`, bare producers) assume them.
            "priority_steps": list(REDIS_PRIORITY_STEPS),
            "queue_order_strategy": "priority",
            "socket_connect_timeout": connect,
            "socket_timeout": read + 5,  # above the BRPOP timeout (1 s) so polls do not trip it
            "retry_on_timeout": False,
            "health_check_interval": 25,
            **_sentinel_options(settings),
        }
    if settings.transport == "amqp":
        # Publisher confirms: a publish returns only once the broker has the message.
        return {"confirm_publish": True, "connect_timeout": connect, "read_timeout": read,
                "write_timeout": read}
    if settings.transport == "sqs":
        return {
            "region": settings.sqs_region,
            "queue_name_prefix": settings.sqs_queue_prefix,  # one namespace per environment
            # short: workers extend what they hold (workers.visibility), a dead one's return
            "visibility_timeout": settings.sqs_visibility_timeout_s,
            "wait_time_seconds": 1,
            "polling_interval": 0.2,
            "is_secure": (settings.sqs_endpoint_url or "https").startswith("https"),
            "client-config": {
                "connect_timeout": connect,
                "read_timeout": read + 1,  # above wait_time_seconds (long polling)
                "retries": {"max_attempts": 3, "mode": "standard"},
            },
        }
    return {}


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    if not settings.broker_url.startswith("sentinel://"):
        return {}
    from workers.sentinel_transport import sentinel_transport_options

    return sentinel_transport_options(settings.broker_url, settings.connect_timeout_s,
                                      wait_replicas=settings.redis_wait_replicas,
                                      wait_timeout_ms=settings.redis_wait_timeout_ms)


def kombu_broker_url(url: str) -> str:
    """The broker URL as kombu gets it: a Sentinel URL without ``?master_name=`` (that goes in
    the transport options; kombu refuses the key when it switches between the URL's parts)."""
    if not url.startswith("sentinel://"):
        return url
    from workers.sentinel_transport import kombu_url

    return kombu_url(url)


def broker_transport(settings: Settings) -> dict[str, Any]:
    """Celery settings that pick Tidegate's Redis transport (see ``workers.transport``).

    ``broker_transport`` wins over the URL's scheme in kombu's ``Connection``. kombu turns TLS
    on for a ``rediss://`` URL only when the transport is named ``rediss``, so without
    ``ssl_*`` options in the URL this keeps kombu's own default for that scheme.
    """
    if settings.transport != "redis" or not settings.redis_reliable_fetch:
        return {}
    from workers.transport import TRANSPORT_PATH

    conf: dict[str, Any] = {"broker_transport": TRANSPORT_PATH}
    if settings.broker_url.startswith("sentinel://"):  # docs/ha.md
        from workers.sentinel_transport import SENTINEL_TRANSPORT_PATH

        conf["broker_transport"] = SENTINEL_TRANSPORT_PATH
    parts = urlsplit(settings.broker_url)
    if parts.scheme == "rediss" and "ssl_" not in parts.query:
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_NONE}  # kombu's rediss default
    return conf


def create_app(settings: Settings | None = None, topology: Topology | None = None) -> Celery:
    """Build the shipped example app (its tasks: the policy file's ``[app] include``, else
    ``TASK_MODULES``) with Tidegate installed.

    ``settings`` default to the environment, read now; the app becomes Celery's current app,
    as any app that ``celery -A`` starts does.
    """
    settings = settings or get_settings()
    include = load_policy_file(settings.policy_file).include  # [app] include, else the example's
    app = Celery("tidegate", broker=settings.broker_url, include=list(include))
    install(app, settings, topology=topology)
    return app


_example: Celery | None = None
_example_lock = threading.Lock()


@exit_on_config_error  # under `celery -A workers`: one line and exit 2, not a traceback
def example_app() -> Celery:
    """``workers.app``: the example app from the environment, built on first use."""
    global _example
    with _example_lock:
        if _example is None:
            _example = create_app()
    return _example
