"""Quiet logs: INFO says what changed, not every request (issue 17: ``make run`` wrote ~7,600
lines in 10 minutes; the one useful line was lost).

Client libraries log each HTTP request at INFO (httpx) or DEBUG (botocore, urllib3), and Celery
logs every task received and succeeded at INFO. Those per-request lines move to WARNING unless
the root logger is at DEBUG, where they stay for whoever asked for them. Failures still show:
Celery logs a failed task at ERROR, and Tidegate's own lines (breaker transitions, retries,
dead letters, deferrals, replays) are unchanged. ``TIDEGATE_LOG_TASKS=true`` keeps Celery's
task received/succeeded lines at INFO (one line per task, for tracing a task through the log)
while the client libraries stay quiet.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["PER_REQUEST_LOGGERS", "quiet_per_request_logs"]

TASK_LOGGERS = (
    "celery.worker.strategy",  # "Task ... received"
    "celery.app.trace",  # "Task ... succeeded in ..." (failures are ERROR: still shown)
)
PER_REQUEST_LOGGERS = (
    "httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer",
    *TASK_LOGGERS,
    "uvicorn.access",  # one line per HTTP request to the API
)


def quiet_per_request_logs(*_: Any, **__: Any) -> None:
    """Raise the per-request loggers to WARNING unless the root logger is at DEBUG."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    # Read when logging is set up (a worker's start), never at import.
    keep = TASK_LOGGERS if os.environ.get("TIDEGATE_LOG_TASKS", "").lower() in (
        "1", "true", "yes") else ()
    for name in PER_REQUEST_LOGGERS:
        if name not in keep:
            logging.getLogger(name).setLevel(logging.WARNING)
