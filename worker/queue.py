"""Sending a job's wake-up message. The message carries only the job's id; a lost or duplicated
message is harmless (the reconciler re-sends, and only one claim succeeds)."""

from __future__ import annotations

import logging

from celery import Celery

from core.db import jobs
from core.db.session import Database
from core.settings import Settings

from .celery_app import RUN_JOB_TASK, create_celery

log = logging.getLogger(__name__)


class JobQueue:
    def __init__(self, celery: Celery, queue: str):
        self.celery = celery
        self.queue = queue

    @classmethod
    def for_settings(cls, settings: Settings) -> JobQueue:
        return cls(create_celery(settings), settings.task_queue)

    def enqueue(self, db: Database, job_id: str) -> bool:
        """Send the job's message and stamp enqueued_at; False (the job stays queued for the reconciler) if the broker is down."""
        try:
            self.celery.send_task(
                RUN_JOB_TASK,
                args=[job_id],
                queue=self.queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
            )
        except Exception as err:  # broker unreachable: the reconciler sends it later
            log.warning("could not enqueue job %s (%s); the reconciler will retry", job_id, err)
            return False
        db.run(lambda session: jobs.mark_enqueued(session, job_id), retry=True)
        return True
