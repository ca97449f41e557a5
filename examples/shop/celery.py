"""The shop's Celery app: a plain Celery app, then one call that installs Tidegate on it."""

from pathlib import Path

from celery import Celery

import workers

app = Celery("shop")
# JSON, one queue (and dead-letter queue) per dependency, routing by task name, the poison-aware
# consumer, and the task modules ([app] include: shop.tasks): all from the policy file beside
# this module (TIDEGATE_POLICY_FILE names another). The broker comes from TIDEGATE_BROKER_URL
# (or the app's own broker_url, when it sets one).
workers.install(app, policy_file=Path(__file__).with_name("policy.toml"))
