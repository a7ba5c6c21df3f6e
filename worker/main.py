"""The worker's entry point, `celery -A worker.main worker` (`peeraid-service worker` runs it): the worker
process builds its Celery app here, from its settings. Nothing else imports this module."""

from __future__ import annotations

from core.settings import get_settings

from .celery_app import create_celery

app = create_celery(get_settings())
