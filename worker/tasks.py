"""Celery tasks: they take a job's id, declare their options here and only here, and are idempotent
(a duplicate delivery finds the job claimed or finished and does nothing)."""

from __future__ import annotations

from core.logs import job_context
from core.settings import get_settings

from .celery_app import RUN_JOB_TASK, app


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    from .runner import run  # the engine (torch) loads in the pool's child process, not in the worker's main process

    with job_context(job_id):
        return run(get_settings(), job_id)
