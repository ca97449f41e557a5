"""``tidegate api``: the HTTP service (FastAPI on uvicorn). See docs/http-api.md."""

from __future__ import annotations

from typing import Annotated

import typer


def api(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve POST /v1/jobs, GET /v1/queues, /healthz, /readyz, /metrics and /docs."""
    import uvicorn

    if workers > 1:
        uvicorn.run("producers.api:create_api", factory=True, host=host, port=port,
                    workers=workers, log_level="info", access_log=False,
                    timeout_graceful_shutdown=10)
        return
    from producers.api import create_api

    # no access log: a line per request drowns the state changes (metrics count requests)
    uvicorn.run(create_api(), host=host, port=port, log_level="info", access_log=False,
                timeout_graceful_shutdown=10)
