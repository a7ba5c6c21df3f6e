"""Celery tasks. The engine is imported inside the task, in the pool's child process."""

from __future__ import annotations

from core.logs import job_context
from core.settings import get_settings

from .celery_app import RUN_JOB_TASK, app
from .runner import JobRunner


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    with job_context(job_id):
        return JobRunner(get_settings(), job_id).run()
