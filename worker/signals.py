"""Worker signal handlers (loaded through the app's `include`): start the reconciler in each worker's
main process, give each pool child its own database connections, and configure logging."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging, worker_process_init, worker_ready

from core.db.session import database
from core.logs import configure
from core.settings import get_settings


@worker_ready.connect
def start_reconciler(sender: Any = None, **_kwargs: Any) -> None:
    from .queue import JobQueue
    from .reconciler import start_reconciler

    settings = get_settings()
    start_reconciler(settings, JobQueue(sender.app, settings.task_queue))


@worker_process_init.connect
def own_database_connections(**_kwargs: Any) -> None:
    """A pool child is forked from the main process, whose reconciler holds pooled connections."""
    database(get_settings().resolved_database_url).forget_inherited_connections()


@setup_logging.connect
def configure_logging(**_kwargs: Any) -> None:
    settings = get_settings()
    configure(settings.log_level, settings.log_json)
