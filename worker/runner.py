"""Runs one job inside a worker: claim it in the database, train through the engine while
heart-beating and writing progress, then publish artifacts and the final status.

The claim is a compare-and-set on (status, attempts), so however many copies of a message the
broker delivers, one worker at a time owns a job. A redelivered or re-queued job resumes from
its last epoch checkpoint."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.models import Artifact, Dataset, EpochMetric, Job, utcnow
from core.db.session import with_retry
from core.settings import Settings
from core.storage import Storage, sha256_file

log = logging.getLogger(__name__)

MEDIA_TYPES = {".json": "application/json", ".md": "text/markdown; charset=utf-8", ".onnx": "application/onnx"}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_dead(worker: str | None) -> bool:
    """True when `worker` names a process on this host that no longer exists."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_stale(job: Job, settings: Settings, now=None) -> bool:
    now = now or utcnow()
    beat = job.heartbeat_at or job.started_at
    return beat is None or (now - beat).total_seconds() > settings.heartbeat_timeout or owner_is_dead(job.worker)


def claim(session: Session, job_id: str, settings: Settings, me: str) -> Job | None:
    job = session.get(Job, job_id)
    if job is None:
        return None
    claimable = job.status == "queued" or (job.status in ("running", "evaluating") and is_stale(job, settings))
    if not claimable or job.cancel_requested:
        return None
    if job.attempts >= job.max_attempts:
        _finish(session, job, "failed", f"gave up after {job.attempts} attempts: the job's worker was lost each time")
        return None
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == job.status, Job.attempts == job.attempts)
        .values(status="running", phase="starting", worker=me, attempts=job.attempts + 1,
                started_at=job.started_at or now, heartbeat_at=now, error=None)
    ).rowcount
    if claimed != 1:
        return None
    session.commit()
    session.refresh(job)
    return job


def _finish(session: Session, job: Job, status: str, error: str | None = None, *, owner: str | None = None) -> None:
    """Record a final status; with `owner`, only while that worker still owns the job."""
    query = update(Job).where(Job.id == job.id)
    if owner is not None:
        query = query.where(Job.worker == owner)
    session.execute(query.values(status=status, error=error, finished_at=utcnow(), phase=status))
    session.commit()


class JobRunner:
    def __init__(self, settings: Settings, job_id: str):
        self.settings = settings
        self.url = settings.resolved_database_url
        self.job_id = job_id
        self.me = worker_name()
        self.storage = Storage(settings.data_dir)
        self.stop_reason: str | None = None  # "cancel" or "lease-lost", set by the heartbeat thread
        self._beating = threading.Event()

    def db(self, work):
        return with_retry(self.url, work)

    def run(self) -> str:
        job = self.db(lambda s: claim(s, self.job_id, self.settings, self.me))
        if job is None:
            log.info("job %s not claimable here (already owned, finished or cancelled); message dropped", self.job_id)
            return "skipped"
        log.info("job %s claimed by %s (attempt %d)", self.job_id, self.me, job.attempts)
        heartbeat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._beating.set()
        heartbeat.start()
        try:
            return self._train(job)
        finally:
            self._beating.clear()
            heartbeat.join(timeout=5)

    def _train(self, job: Job) -> str:
        from core.engine.errors import DatasetError
        from core.engine.sources import load_splits
        from core.engine.job import run_job
        from core.engine.spec import JobSpec
        from core.engine.errors import TrainingCancelled, TrainingDiverged

        from .callbacks import DatabaseCallbacks

        try:
            spec = JobSpec.model_validate(job.spec)
            self.update_job(phase="loading dataset")
            splits = load_splits(
                self._dataset_source(spec.dataset), data_root=self.settings.builtin_data_root,
                val_fraction=spec.val_fraction, seed=spec.seed, download=self.settings.allow_downloads,
            )
            callbacks = DatabaseCallbacks(self, job, spec)
            result = run_job(
                spec, splits, self.storage.job_dir(job.id), device=self.settings.worker_device, callbacks=callbacks,
                progress_interval=self.settings.progress_interval,
            )
        except TrainingCancelled:
            if self.stop_reason == "lease-lost":
                log.warning("job %s: another worker took over; stopping here", job.id)
                return "lease-lost"
            return self._end(job, "cancelled")
        except TrainingDiverged as err:
            return self._end(job, "failed", f"{err} (the last good checkpoint is kept)")
        except (DatasetError, ValueError) as err:
            return self._end(job, "failed", f"{type(err).__name__}: {err}")
        except OSError as err:
            return self._end(job, "failed", f"storage error: {err}")
        except Exception as err:
            log.exception("job %s crashed", job.id)
            return self._end(job, "failed", f"internal error: {type(err).__name__}: {err}")
        self.db(lambda s: self._publish(s, job.id, result))
        log.info("job %s succeeded", job.id)
        return "succeeded"

    def _end(self, job: Job, status: str, error: str | None = None) -> str:
        self.db(lambda s: _finish(s, job, status, error, owner=self.me))
        return status

    def _dataset_source(self, name: str) -> str:
        if not name.startswith("ds_"):
            return name
        dataset = self.db(lambda s: s.get(Dataset, name))
        if dataset is None:
            raise ValueError(f"dataset {name} was deleted before the job ran")
        return str(self.storage.path(dataset.storage_key))

    def _publish(self, session: Session, job_id: str, result) -> None:
        if session.scalar(select(Job.worker).where(Job.id == job_id)) != self.me:
            log.warning("job %s was taken over by another worker; its result is theirs to publish", job_id)
            return
        session.query(Artifact).filter(Artifact.job_id == job_id).delete()
        for name, path in result.artifacts.items():
            path = Path(path)
            session.add(
                Artifact(
                    job_id=job_id, name=name, file_name=path.name, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                    size_bytes=path.stat().st_size, sha256=sha256_file(path), storage_key=self.storage.job_key(job_id, path),
                )
            )
        report = result.report
        best = {key: {"epoch": m["best_epoch"], **m["validation"]} for key, m in report.items()}
        session.execute(
            update(Job).where(Job.id == job_id, Job.worker == self.me).values(
                status="succeeded", phase="succeeded", finished_at=utcnow(), result=report, best_metrics=best, error=None
            )
        )
        session.commit()

    def update_job(self, **values: Any) -> None:
        """Write to the job's row while this worker still owns it."""
        self.db(lambda s: (s.execute(update(Job).where(Job.id == self.job_id, Job.worker == self.me).values(**values)), s.commit()))

    def _heartbeat(self) -> None:
        """Every heartbeat_interval: prove liveness, and learn of cancellation or a lost lease."""
        while self._beating.is_set():
            try:
                row = self.db(self._beat)
            except Exception:  # the database is gone for longer than the retries: keep training, try again
                log.exception("heartbeat for job %s failed", self.job_id)
                row = None
            if row is not None:
                worker, cancel = row
                if worker != self.me:
                    self.stop_reason = "lease-lost"
                elif cancel:
                    self.stop_reason = "cancel"
            deadline = time.monotonic() + self.settings.heartbeat_interval
            while self._beating.is_set() and time.monotonic() < deadline:
                time.sleep(0.1)

    def _beat(self, session: Session):
        session.execute(update(Job).where(Job.id == self.job_id, Job.worker == self.me).values(heartbeat_at=utcnow()))
        session.commit()
        return session.execute(select(Job.worker, Job.cancel_requested).where(Job.id == self.job_id)).one_or_none()

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def record_epochs(self, session: Session, job: Job, records: list[dict[str, Any]], *, replace: bool = True) -> None:
        """Write per-epoch metrics, one row per epoch: a resumed job never duplicates an epoch.

        replace=False only fills in epochs that are missing (a checkpoint written just before a crash)."""
        epochs = [r["epoch"] for r in records]
        existing = EpochMetric.job_id == job.id, EpochMetric.epoch.in_(epochs)
        if replace:
            session.query(EpochMetric).filter(*existing).delete()
            present = set()
        else:
            present = set(session.scalars(select(EpochMetric.epoch).where(*existing)))
        for record in records:
            if record["epoch"] not in present:
                session.add(EpochMetric(job_id=job.id, epoch=record["epoch"], attempt=job.attempts, record=record))
