"""The Celery side of Tidegate: ``celery -A workers worker -Q payments``."""

from workers.application import create_app

app = create_app()

__all__ = ["app", "create_app"]
