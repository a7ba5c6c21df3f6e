"""Runs one job inside a worker: claim it, train and evaluate through the engine under the job's
lease, then record the outcome. A redelivered or re-queued job resumes from its last epoch checkpoint;
however many copies of its message arrive, one worker at a time owns the job."""

from __future__ import annotations

import logging
from pathlib import Path

from core.db import jobs
from core.db.models import Dataset, Job, JobStatus
from core.db.session import Database, database
from core.engine.errors import (
    CheckpointError,
    DatasetError,
    EngineError,
    ExportError,
    SpecError,
    TrainingCancelled,
    TrainingDiverged,
)
from core.engine.job import JobResult, run_job
from core.engine.sources import load_splits
from core.engine.spec import JobSpec
from core.settings import Settings
from core.storage import Storage, sha256_file

from .callbacks import DatabaseCallbacks
from .lease import JobLease, is_stale, worker_name

log = logging.getLogger(__name__)

MEDIA_TYPES = {".json": "application/json", ".md": "text/markdown; charset=utf-8", ".onnx": "application/onnx"}

# What a user reads when a job fails, by the kind of failure (the first matching type wins).
FAILURE_MESSAGES: tuple[tuple[type[BaseException], str], ...] = (
    (TrainingDiverged, "{err} (the last good checkpoint is kept)"),
    (DatasetError, "dataset: {err}"),
    (SpecError, "job spec: {err}"),
    (CheckpointError, "checkpoint: {err}"),
    (ExportError, "export: {err}"),
    (EngineError, "{err}"),
    (OSError, "storage error: {err}"),
)


def failure_message(err: BaseException) -> str:
    for kind, template in FAILURE_MESSAGES:
        if isinstance(err, kind):
            return template.format(err=err)
    return f"internal error: {type(err).__name__}: {err}"


def run(settings: Settings, job_id: str) -> str:
    """Claim and run the job; returns what happened ("succeeded", "failed", "cancelled", "skipped", "lease-lost")."""
    db = database(settings.resolved_database_url)
    me = worker_name()
    job = db.run(lambda session: jobs.claim(session, job_id, me, is_stale=lambda j: is_stale(j, settings)), retry=True)
    if job is None:
        log.info("job %s not claimable here (already owned, finished or cancelled); message dropped", job_id)
        return "skipped"
    log.info("job %s claimed by %s (attempt %d)", job_id, me, job.attempts)
    with JobLease(db, jobs.Lease(job_id, me), job.attempts, settings.heartbeat_interval) as lease:
        return _train(settings, db, job, lease)


def _train(settings: Settings, db: Database, job: Job, lease: JobLease) -> str:
    storage = Storage(settings.data_dir)
    try:
        spec = JobSpec.model_validate(job.spec)
        lease.write(jobs.report_progress, job.progress or {}, "loading dataset")
        source, resize = _dataset_source(db, storage, spec.dataset)
        splits = load_splits(
            source, resize=resize, data_root=settings.builtin_data_root,
            val_fraction=spec.val_fraction, seed=spec.seed, download=settings.allow_downloads, selection=spec.selection,
        )
        result = run_job(
            spec, splits, storage.job_dir(job.id), device=settings.worker_device,
            callbacks=DatabaseCallbacks(lease, spec.batch_size), progress_interval=settings.progress_interval,
        )
    except TrainingCancelled:
        if lease.stop_reason == "lease-lost":
            log.warning("job %s: another worker took over; stopping here", job.id)
            return "lease-lost"
        lease.write(jobs.finish, JobStatus.CANCELLED)
        return "cancelled"
    except Exception as err:
        if not isinstance(err, EngineError | OSError):
            log.exception("job %s crashed", job.id)
        lease.write(jobs.finish, JobStatus.FAILED, error=failure_message(err))
        return "failed"
    if not lease.write(jobs.succeed, result=result.report, best=_best(result), artifacts=_artifact_files(storage, job.id, result)):
        log.warning("job %s was taken over by another worker; its result is theirs to publish", job.id)
        return "lease-lost"
    log.info("job %s succeeded", job.id)
    return "succeeded"


def _dataset_source(db: Database, storage: Storage, name: str) -> tuple[str, tuple[int, int] | None]:
    """A built-in name as is; an uploaded dataset's id as the path of its stored file and the size its
    images were resized to when it was validated."""
    if not name.startswith("ds_"):
        return name, None
    dataset = db.run(lambda session: session.get(Dataset, name), retry=True)
    if dataset is None:
        raise DatasetError(f"dataset {name} was deleted before the job ran")
    return str(storage.path(dataset.storage_key)), tuple(dataset.resize) if dataset.resize else None


def _best(result: JobResult) -> dict:
    return {key: {"epoch": m["best_epoch"], **m["validation"]} for key, m in result.report.items()}


def _artifact_files(storage: Storage, job_id: str, result: JobResult) -> list[jobs.ArtifactFile]:
    return [
        jobs.ArtifactFile(
            name=name, file_name=Path(path).name, media_type=MEDIA_TYPES.get(Path(path).suffix, "application/octet-stream"),
            size_bytes=Path(path).stat().st_size, sha256=sha256_file(Path(path)), storage_key=storage.job_key(job_id, Path(path)),
        )
        for name, path in result.artifacts.items()
    ]
