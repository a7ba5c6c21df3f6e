"""Celery tasks: they take a job's id, declare their options here and only here, and are idempotent
(a duplicate delivery finds the job claimed or finished and does nothing)."""

from __future__ import annotations

import resource

from celery import shared_task

from core.logs import job_context
from core.settings import Settings, get_settings

from .celery_app import RUN_JOB_TASK
from .lease import claim, give_back, host_memory_bytes


@shared_task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    """The task queued messages name (RUN_JOB_TASK, which must not change); the engine's run_job trains."""
    settings = get_settings()
    with job_context(job_id):
        claimed = claim(settings, job_id)  # before the engine loads: a duplicate message costs one short transaction
        if claimed is None:
            return "skipped"
        try:
            from .runner import run_claimed  # the engine (torch) loads in the pool's child process, not in the worker's main process

            limit_memory(settings)
            if settings.worker_threads:
                import torch

                torch.set_num_threads(settings.worker_threads)
        except BaseException as err:  # the job is claimed but no lease holds it yet: give it back at once, with why
            give_back(claimed, f"its worker could not start it ({type(err).__name__}: {err})")
            raise
        return run_claimed(settings, *claimed)


def limit_memory(settings: Settings) -> None:
    """On a CPU worker, a hard ceiling on this pool process's memory: an allocation past it fails the job
    cleanly instead of waking the host's OOM killer (which would kill and re-deliver it, attempt after
    attempt). GPU workers reserve vast address ranges, so there the lease's watchdog enforces it instead."""
    from core.engine.trainer import resolve_device

    if resolve_device(settings.worker_device).type != "cpu":
        return
    limit = settings.worker_max_memory_bytes or int(0.8 * host_memory_bytes())
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
