"""Runs one job inside a worker: claim it, train and evaluate through the engine under the job's
lease, then record the outcome. A redelivered or re-queued job resumes from its last epoch checkpoint;
however many copies of its message arrive, one worker at a time owns the job."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable
from typing import Any

from core.db import jobs
from core.db.models import Dataset, Job, JobStatus
from core.db.session import Database
from core.engine.artifacts import ARTIFACTS, ARTIFACTS_DIR
from core.engine.datasets import DatasetSplits
from core.engine.errors import (
    CheckpointError,
    DatasetError,
    EngineError,
    ExportError,
    SpecError,
    TrainingCancelled,
    TrainingDiverged,
)
from core.engine.estimates import DataShape
from core.engine.pipeline import JobResult, export_checkpoint_student, run_job
from core.engine.preflight import device_class, preflight
from core.engine.sources import load_splits
from core.engine.spec import build_spec
from core.engine.trainer import resolve_device
from core.settings import Settings
from core.storage import Storage, sha256_file
from core.text import format_duration

from .callbacks import DatabaseCallbacks
from .lease import JobLease, JobLimits, claim, host_memory_bytes

log = logging.getLogger(__name__)

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


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def failure_message(err: BaseException) -> str:
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OUT_OF_MEMORY)):
        return f"out of memory: {err}; use a smaller batch_size, evaluation.batch_size or input size"
    for kind, template in FAILURE_MESSAGES:
        if isinstance(err, kind):
            return template.format(err=err)
    return f"internal error: {type(err).__name__}: {err}"


def limits_for(settings: Settings, job: Job, now: dt.datetime) -> JobLimits:
    """The job's deadline counts from its first start, across attempts (`now` and the start both by the database's clock)."""
    elapsed = (now - job.started_at).total_seconds() if job.started_at else 0.0
    return JobLimits(
        deadline=time.monotonic() + settings.max_job_seconds - elapsed,
        max_memory_bytes=settings.worker_max_memory_bytes or int(0.8 * host_memory_bytes()),
    )


STOPPED_BY_LIMIT = {
    "time-limit": "the job ran past its time limit of {duration} (PEERAID_MAX_JOB_SECONDS)",
    "memory-limit": "the job's process passed its memory ceiling of {gib:.1f} GiB (PEERAID_WORKER_MAX_MEMORY_BYTES)",
}


def run(settings: Settings, job_id: str) -> str:
    """Claim and run the job; returns what happened ("succeeded", "failed", "cancelled", "skipped", "lease-lost")."""
    claimed = claim(settings, job_id)
    if claimed is None:
        return "skipped"
    return run_claimed(settings, *claimed)


def run_claimed(settings: Settings, db: Database, lease: jobs.Lease, job: Job) -> str:
    """Run a job this worker claimed (`lease`), under its lease's heartbeat."""
    log.info("job %s claimed by %s (attempt %d)", job.id, lease.worker, lease.attempt)
    limits = limits_for(settings, job, db.run(jobs.clock, retry=True))
    with JobLease(db, lease, settings.heartbeat_interval, limits) as held:
        return _train(settings, db, job, held)


def _train(settings: Settings, db: Database, job: Job, lease: JobLease) -> str:
    storage = Storage(settings.data_dir)
    splits = None
    try:
        spec = build_spec(None, job.spec)  # a stored spec that no longer validates is a SpecError, said as such
        lease.write(jobs.report_progress, job.progress or {}, "loading dataset")
        splits = load_splits(
            **_dataset_source(db, storage, spec.dataset),
            data_root=settings.builtin_data_root,
            val_fraction=spec.val_fraction,
            seed=spec.seed,
            download=settings.allow_downloads,
            selection=spec.selection,
        )
        device = resolve_device(settings.worker_device)
        estimate = preflight(spec, DataShape.of(splits))
        result = run_job(
            spec,
            splits,
            storage.job_dir(job.id),
            device=device,
            callbacks=DatabaseCallbacks(lease, spec.batch_size, estimate.evaluation_share(device_class(device))),
            progress_interval=settings.progress_interval,
            job_id=job.id,
        )
    except TrainingCancelled:
        reason = lease.stop_reason
        if reason == "lease-lost":
            log.warning("job %s: another worker took over; stopping here", job.id)
            return "lease-lost"
        if reason in STOPPED_BY_LIMIT:
            limits = lease.limits
            error = STOPPED_BY_LIMIT[reason].format(duration=format_duration(settings.max_job_seconds), gib=limits.max_memory_bytes / 2**30)
            kept = _kept(storage, job.id, splits, f"stopped: {error}")
            outcome = "the last checkpoint's student is kept" if kept else "no epoch had finished, so no model is kept"
            lease.write(jobs.finish, JobStatus.FAILED, error=f"{error}; {outcome}", artifacts=kept)
            return "failed"
        kept = _kept(storage, job.id, splits, "cancelled")
        lease.write(jobs.finish, JobStatus.CANCELLED, artifacts=kept)
        return "cancelled"
    except Exception as err:
        if not isinstance(err, EngineError | OSError):
            log.exception("job %s crashed", job.id)
        error = failure_message(err)
        kept = _kept(storage, job.id, splits, f"failed: {error}")
        lease.write(jobs.finish, JobStatus.FAILED, error=error, artifacts=kept)
        return "failed"
    artifacts = _artifact_records(storage, job.id, result.artifacts)
    if not lease.write(
        jobs.succeed,
        result=result.report,
        best=_best(result),
        evaluation=result.evaluation,
        warnings=result.warnings,
        execution=result.model_card.get("execution") or {},
        artifacts=artifacts,
    ):
        log.warning("job %s was taken over by another worker; its result is theirs to publish", job.id)
        return "lease-lost"
    log.info("job %s succeeded", job.id)
    return "succeeded"


def _dataset_source(db: Database, storage: Storage, name: str) -> dict[str, Any]:
    """load_splits' arguments for the job's dataset: a built-in name as is; an upload (by id) as the path of its
    stored file, the size its images were resized to when it was validated, its name and its id."""
    if not name.startswith("ds_"):
        return {"dataset": name}
    dataset = db.run(lambda session: session.get(Dataset, name), retry=True)
    if dataset is None:
        raise DatasetError(f"dataset {name} was deleted before the job ran")
    resize = tuple(dataset.resize) if dataset.resize else None
    return {"dataset": str(storage.path(dataset.storage_key)), "resize": resize, "name": dataset.name, "dataset_id": dataset.id}


def _best(result: JobResult) -> dict:
    return {key: {"epoch": m["best_epoch"], **m["validation"]} for key, m in result.report.items()}


def _kept(storage: Storage, job_id: str, splits: DatasetSplits | None, stopped: str) -> list[jobs.ArtifactRecord]:
    """A job that stopped early keeps its last checkpoint's students, as weights with a model card."""
    if splits is None:
        return []
    try:
        exported = export_checkpoint_student(storage.job_dir(job_id), splits, stopped=stopped, job_id=job_id)
        return _artifact_records(storage, job_id, exported)
    except (CheckpointError, OSError) as err:  # no epoch finished, or the disk is full: nothing to keep
        log.info("job %s keeps no student: %s", job_id, err)
        return []


def _artifact_records(storage: Storage, job_id: str, names: Iterable[str]) -> list[jobs.ArtifactRecord]:
    """The rows of the job's published artifacts (`names`, as the engine wrote them), each file's place built from ids."""
    records = []
    for name in names:
        kind = ARTIFACTS[name]
        key = storage.job_key(job_id, ARTIFACTS_DIR, kind.file_name)
        path = storage.path(key)
        records.append(
            jobs.ArtifactRecord(
                name=name,
                file_name=kind.file_name,
                media_type=kind.media_type,
                size_bytes=path.stat().st_size,
                sha256=sha256_file(path),
                storage_key=key,
            )
        )
    return records
