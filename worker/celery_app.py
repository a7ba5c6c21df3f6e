"""The Celery application's configuration, nothing else: one job at a time per worker process (one worker
per GPU), a fresh process per job (but not per dropped duplicate message), and redelivery when a worker dies.
No app is built at import: the worker builds its own (worker/main.py, `celery -A worker.main`), the API its
own in `create_app` (through worker.queue). Task options are declared with the task (worker/tasks.py, a
shared task, so it belongs to whichever app runs it); signal handlers live in worker/signals.py.

The database stays the source of truth: the reconciler re-sends what the broker lost."""

from __future__ import annotations

from celery import Celery

from core.settings import Settings

RUN_JOB_TASK = "peeraid.run_job"
# A pool process is replaced once it has held more than this (in KiB). The engine alone takes 630 MiB, so every
# process that ran a job is replaced after it (GPU memory returned, no state carried to the next job), while one
# that only dropped messages for jobs it could not claim (about 90 MiB, no engine) lives on: a duplicate message
# costs milliseconds, not the second it takes to start a process (replacing the process after every message did).
RECYCLE_ABOVE_KIB = 300 * 1024


def create_celery(settings: Settings) -> Celery:
    app = Celery("peeraid", broker=settings.resolved_broker_url, include=["worker.tasks", "worker.signals"])
    app.conf.update(
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_memory_per_child=RECYCLE_ABOVE_KIB,  # a fresh process after every job (see RECYCLE_ABOVE_KIB)
        task_default_queue=settings.task_queue,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out broker restarts
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for flower
        task_send_sent_event=True,
    )
    if settings.resolved_broker_url.startswith(("redis", "rediss", "sqs")):
        # an unacknowledged message comes back after this long, so it must outlast the longest job
        app.conf.broker_transport_options = {"visibility_timeout": settings.max_job_seconds + 3600}
    return app
