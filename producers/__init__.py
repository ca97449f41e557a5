"""The producing side: the ``Producer`` API and the HTTP service on top of it."""

from producers.producer import EnqueueResult, Producer

__all__ = ["EnqueueResult", "Producer"]
