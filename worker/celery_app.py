"""The Celery application: one job at a time per worker (one worker per GPU), late acks, and
redelivery when a worker process dies. The database stays the source of truth: the reconciler
re-sends what the broker lost (see worker/reconciler.py)."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery
from celery.signals import setup_logging, worker_process_init, worker_ready

from core.settings import Settings, get_settings

RUN_JOB_TASK = "peeraid.run_job"
log = logging.getLogger(__name__)


def create_celery(settings: Settings) -> Celery:
    app = Celery("peeraid", broker=settings.resolved_broker_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,  # a fresh process per job: GPU memory is returned, no state leaks
        task_ignore_result=True,  # results live in the database
        task_default_queue=settings.task_queue,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out broker restarts
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for flower
        task_send_sent_event=True,
    )
    if settings.resolved_broker_url.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return app


app = create_celery(get_settings())


@lru_cache
def _app_for(broker_url: str) -> Celery:
    return app if broker_url == app.conf.broker_url else Celery("peeraid", broker=broker_url)


def enqueue_job(settings: Settings, job_id: str) -> bool:
    """Send the job's message and stamp enqueued_at; False (job stays queued for the reconciler) if the broker is down."""
    from sqlalchemy import update

    from core.db.models import Job, utcnow
    from core.db.session import session_scope

    try:
        _app_for(settings.resolved_broker_url).send_task(
            RUN_JOB_TASK, args=[job_id], queue=settings.task_queue,
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
        )
    except Exception as err:  # broker unreachable: the reconciler sends it later
        log.warning("could not enqueue job %s (%s); the reconciler will retry", job_id, err)
        return False
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
    return True


@worker_ready.connect
def _start_reconciler(sender=None, **_kwargs) -> None:
    """Every worker's main process reconciles the database with the broker (worker/reconciler.py)."""
    from .reconciler import start_reconciler

    start_reconciler(get_settings())


@worker_process_init.connect
def _own_database_connections(**_kwargs) -> None:
    """A pool child is forked from the main process, whose reconciler holds pooled database connections:
    drop the inherited ones (without closing them under the parent) so the child opens its own."""
    from core.db.session import engine_for

    engine_for(get_settings().resolved_database_url).dispose(close=False)


@setup_logging.connect
def _configure_logging(**_kwargs) -> None:
    from core.logs import configure

    settings = get_settings()
    configure(settings.log_level, settings.log_json)
