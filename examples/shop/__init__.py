"""A small shop adopting Tidegate: ``celery -A shop worker -Q inventory,payments`` (from
``examples/``). Its app is in ``shop/celery.py``, as Celery's own guide lays a project out."""

from shop.celery import app

__all__ = ["app"]
