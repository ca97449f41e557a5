"""The producing side: the ``Producer`` API and the HTTP service on top of it."""

from producers.producer import AsyncProducer, EnqueueResult, Job, Producer

__all__ = ["AsyncProducer", "EnqueueResult", "Job", "Producer"]
