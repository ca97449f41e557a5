"""Tidegate on a Celery app: :func:`install` puts it there, :func:`installation` reads it back.

Library mode (docs/adopting.md)::

    app = Celery("shop", include=["shop.tasks"])
    workers.install(app, policy_file="shop/policy.toml")

``install`` is the only thing that ties Tidegate to an app: it configures the app (JSON only,
the policy file's queues and dead-letter queues, routing, the poison-aware consumer, the
wake-up bootstep, reporting to the shared Redis) and records the settings and topology it used
here, in one table keyed by the app. Everything else (``Producer(app)``, the resilient tasks,
the dead-letter tools, the replayer) asks :func:`installation` and gets a one-line
:class:`NotInstalled` when the app has none. Importing this module builds nothing and reads
no environment; only calling :func:`install` (or :func:`load_app`) does.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import signals

from resilience.errors import ConfigError
from workers.logs import quiet_per_request_logs
from workers.settings import Settings, load_settings
from workers.startup import exit_on_config_error
from workers.topology import DEFAULT_QUEUE, Topology, load_topology

__all__ = ["APP_ENV", "DEFAULT_APP", "Installation", "NotInstalled", "install", "installation",
           "load_app"]

APP_ENV = "TIDEGATE_APP"
DEFAULT_APP = "workers:app"  # the shipped example pipeline (built on first use)


class NotInstalled(ConfigError):
    """A Tidegate component was handed a Celery app that Tidegate was not installed on."""


@dataclass(frozen=True)
class Installation:
    """What :func:`install` used for one app: read once, never changed."""

    settings: Settings
    topology: Topology


_lock = threading.Lock()
_installed: weakref.WeakKeyDictionary[Any, Installation] = weakref.WeakKeyDictionary()


def installation(app: Any) -> Installation:
    """The settings and topology Tidegate was installed with on ``app``."""
    found = _installed.get(app)
    if found is None:
        raise _not_installed(app)
    return found


def _not_installed(app: Any) -> NotInstalled:
    return NotInstalled(
        f"this Celery app ({getattr(app, 'main', None) or app!r}) has no Tidegate installed; "
        "call workers.install(app) first (docs/adopting.md)")


def is_installed(app: Any) -> bool:
    return app in _installed


def _settings_for(app: Any, policy_file: str | Path | None) -> Settings:
    """Settings from the environment; the broker is the app's own when it names one."""
    overrides: dict[str, Any] = {}
    if policy_file is not None and not os.environ.get("TIDEGATE_POLICY_FILE"):
        overrides["policy_file"] = Path(policy_file)  # a deployment's own copy wins
    own = app.conf.broker_url
    if own:
        named = os.environ.get("TIDEGATE_BROKER_URL")
        if named and named != own:
            # (neither URL is printed: either may carry a password)
            raise ConfigError("the app's broker_url and TIDEGATE_BROKER_URL differ; set only "
                              "one (Tidegate uses the app's when TIDEGATE_BROKER_URL is unset)")
        overrides["broker_url"] = own
    return load_settings(**overrides)


@exit_on_config_error  # under the celery command: one line and exit 2, not a traceback
def install(app: Any, settings: Settings | None = None, *,
            policy_file: str | Path | None = None,
            topology: Topology | None = None) -> Installation:
    """Install Tidegate on ``app``; call it once, where the app is configured.

    ``settings`` default to the ``TIDEGATE_*`` environment (read now, not at import), with the
    app's own ``broker_url`` when it has one; ``policy_file`` is the app's own policy file,
    used unless ``TIDEGATE_POLICY_FILE`` names another (or ``settings`` are given: then it
    replaces theirs); ``topology`` defaults to the policy file's dependencies.
    Raises :class:`~resilience.errors.ConfigError` naming what is wrong.
    """
    with _lock:
        if app in _installed:
            raise ConfigError("Tidegate is already installed on this Celery app")
        if settings is None:
            settings = _settings_for(app, policy_file)
        elif policy_file is not None:
            settings = load_settings(**{**settings.model_dump(), "policy_file": Path(policy_file)})
        topology = topology or load_topology(settings.policy_file)
        _configure(app, settings, topology)
        found = _installed[app] = Installation(settings, topology)
    return found


def _configure(app: Any, settings: Settings, topology: Topology) -> None:
    from workers.application import broker_transport, kombu_broker_url, transport_options

    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any):
        queue = topology.queue_for_task(name)
        # unmatched tasks fall through to the app's own routes, then the default queue
        return {"queue": queue} if queue != DEFAULT_QUEUE else None

    from workers.policy_file import load_policy_file

    # The policy file's [app] include adds task modules to the app's own include (what a
    # worker imports at start); left out, the app's own include/autodiscovery is all.
    declared = load_policy_file(settings.policy_file).schema.app.include or ()
    include = tuple(dict.fromkeys((*(app.conf.include or ()), *declared)))
    own_routes = app.conf.task_routes
    own_routes = (() if not own_routes else tuple(own_routes)
                  if isinstance(own_routes, list | tuple) else (own_routes,))
    app.conf.update(
        include=include,
        broker_url=kombu_broker_url(settings.broker_url),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Task events on, so Flower and `celery events` see every task and its true outcome
        # (dead-lettered: FAILURE with the reason; queued for later: DEFERRED). Cost in
        # docs/delivery.md ("Flower and celery inspect"); TIDEGATE_TASK_EVENTS=false: off.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_ignore_result=True,
        task_queues=topology.kombu_queues(),
        task_default_queue=DEFAULT_QUEUE,
        task_default_exchange=DEFAULT_QUEUE,
        task_default_routing_key=DEFAULT_QUEUE,
        task_create_missing_queues=False,
        task_routes=(route, *own_routes),
        task_acks_late=False,  # ResilientTask acks late: after deciding the outcome
        worker_consumer="workers.poison:PoisonAwareConsumer",  # poison -> DLQ, not dropped
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_hard_time_limit_s,
        worker_prefetch_multiplier=1,
        # Quorum queues ([queues] queue_type, docs/ha.md) refuse a global prefetch limit:
        # Celery then sets per-consumer QoS (prefetch = concurrency, fixed).
        worker_detect_quorum_queues=True,
        # A connection loss does not kill running tasks (prefork would terminate them, then
        # respawn children for seconds): they finish and record their outcome in the marks,
        # and RabbitMQ's redelivered copy is parked until then (workers.outcomes.park).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        broker_connection_timeout=settings.connect_timeout_s,
        broker_connection_retry_on_startup=True,
        # A worker rides out a broker outage (reconnecting with Celery's capped backoff) rather
        # than exiting; producers never wait on the broker (they publish with retry=False).
        broker_connection_max_retries=None,
        broker_transport_options=transport_options(settings),
        broker_pool_limit=10,
        **broker_transport(settings),
    )
    _report_to_cluster(app, settings)
    from workers.wakeup import LoopWakeup

    app.steps["consumer"].add(LoopWakeup)  # warm shutdown within ~1 s on every transport
    from workers.liveness_step import Liveness

    app.steps["consumer"].add(Liveness)  # heartbeats; Redis: the orphan sweep


def _report_to_cluster(app: Any, settings: Settings) -> None:
    """In worker processes: mirror this process's counters (sheds, retries, dead letters...)
    and each task's processing time into the shared Redis, where the exporter and the
    desired-workers figure read them. Only Celery's worker signals start anything."""
    from resilience.stores import redis_client
    from workers.autoscale import ProcessingTimes, record_processing_times
    from workers.cluster_metrics import install as install_mirror
    from workers.latency_share import install as share_latency

    client = redis_client(settings.redis_url, socket_timeout=settings.read_timeout_s,
                          socket_connect_timeout=settings.connect_timeout_s)
    install_mirror(app, client)
    share_latency(app, client)
    record_processing_times(app, ProcessingTimes(client))


def load_app(spec: str | None = None) -> Any:
    """The Celery app named the way ``celery -A`` names one (``myproj.celery:app``, or a module
    holding ``app``/``celery``): ``spec``, else ``TIDEGATE_APP``, else the shipped example.
    It must have Tidegate installed."""
    from celery.app.utils import find_app

    name = spec or os.environ.get(APP_ENV) or DEFAULT_APP
    try:
        app = find_app(name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the Celery app {name!r}: {exc}") from None
    installation(app)
    return app


def _check_worker(sender: Any = None, **_: Any) -> None:
    """Refuse to start, in one line, a worker that would lose or misroute work: one whose app
    carries resilient tasks but no Tidegate (each message would run into an error and be
    acked), or a resilient task whose dependency the policy file does not declare."""
    from workers.resilient import ResilientTask

    app = getattr(sender, "app", None)
    if app is None:
        return
    resilient = [t for t in app.tasks.values() if isinstance(t, ResilientTask)]
    if not resilient:
        return
    if not is_installed(app):
        raise SystemExit(f"tidegate: error: {_not_installed(app)}")
    topology = installation(app).topology
    known = {d.name for d in topology.dependencies}
    for task in resilient:
        if task.dependency not in known:
            raise SystemExit(
                f"tidegate: error: task {task.name}: dependency {task.dependency!r} is not in "
                f"the policy file {installation(app).settings.policy_file} (declared: "
                f"{', '.join(sorted(known))})")


signals.worker_init.connect(_check_worker, weak=False)
# after Celery's own logging setup, which would otherwise leave per-task lines at INFO
signals.after_setup_logger.connect(quiet_per_request_logs, weak=False)
