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

import threading
from typing import Any

from celery import Celery

from workers.brokers import broker_for
from workers.installation import install
from workers.policy_file import DEFAULT_TASK_MODULES, load_policy_file
from workers.settings import Settings, get_settings
from workers.startup import exit_on_config_error
from workers.topology import Topology

TASK_MODULES = DEFAULT_TASK_MODULES  # the policy file's ``[app] include`` when left out


def transport_options(settings: Settings) -> dict[str, Any]:
    """Celery's ``broker_transport_options`` for the broker (its adapter's)."""
    return broker_for(settings).transport_options(settings)


def kombu_broker_url(url: str) -> str:
    """The broker URL as kombu gets it (a Sentinel URL loses ``?master_name=``)."""
    return broker_for(url).kombu_url(url)


def broker_transport(settings: Settings) -> dict[str, Any]:
    """Extra Celery settings the broker's adapter asks for (Tidegate's Redis transport)."""
    return broker_for(settings).celery_conf(settings)


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
