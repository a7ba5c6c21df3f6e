"""Every write to a job row, one named transition each. Nothing else updates `jobs`.

A worker owns a job while `Job.worker` names it (its lease). Each write a worker makes is guarded
by that lease (`_owned`), so a worker that lost its job — to the reconciler or to another worker
after a long pause — can no longer change it. Transitions return whether they took effect."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Update, delete, func, or_, select, update
from sqlalchemy.orm import Session

from .models import (
    ACTIVE_STATUSES,
    LEASED_STATUSES,
    TERMINAL_STATUSES,
    Artifact,
    EpochMetric,
    Job,
    JobStatus,
    Tenant,
    utcnow,
)


@dataclass(frozen=True)
class Lease:
    """A worker's ownership of a job."""

    job_id: str
    worker: str


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    file_name: str
    media_type: str
    size_bytes: int
    sha256: str
    storage_key: str


class ActiveJobLimit(Exception):
    def __init__(self, active: int, limit: int):
        self.active, self.limit = active, limit
        super().__init__(f"{active} jobs queued or running (limit {limit})")


class JobFinished(Exception):
    """The job already reached a final status: it cannot be cancelled."""

    def __init__(self, job: Job):
        self.job = job
        super().__init__(f"job {job.id} already {job.status}")


class JobActive(Exception):
    """The job is queued or running: it cannot be deleted."""

    def __init__(self, job: Job):
        self.job = job
        super().__init__(f"job {job.id} is {job.status}; cancel it first")


# --- submission and the user's actions -----------------------------------------------------


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise this tenant's submissions: a no-op write takes the row lock (PostgreSQL) or the
    database's write lock (SQLite) before anything is counted, so count-then-insert is atomic."""
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))


def create(session: Session, *, tenant_id: str, max_active: int, **fields: Any) -> Job:
    """A new queued job, unless the tenant already has `max_active` queued or running ones.
    Call `lock_tenant` first in the same transaction."""
    active = session.scalar(select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))) or 0
    if active >= max_active:
        raise ActiveJobLimit(active, max_active)
    job = Job(tenant_id=tenant_id, status=JobStatus.QUEUED, **fields)
    session.add(job)
    session.flush()
    return job


def mark_enqueued(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(enqueued_at=utcnow()))


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one is flagged, and its worker stops at its next check."""
    if job.status in TERMINAL_STATUSES:
        raise JobFinished(job)
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, phase="cancelled before it started", finished_at=now, cancel_requested=True)
    )
    session.execute(update(Job).where(Job.id == job.id, Job.status.in_(LEASED_STATUSES)).values(cancel_requested=True))
    session.refresh(job)
    return job


def delete_finished(session: Session, job: Job) -> None:
    if job.status not in TERMINAL_STATUSES:
        raise JobActive(job)
    session.delete(job)


def page(session: Session, tenant_id: str, status: JobStatus | None, limit: int, offset: int) -> tuple[int, list[Job]]:
    """A tenant's jobs, newest first: (total, this page)."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    return total, list(session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)))


def artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def epochs(session: Session, job_id: str) -> list[EpochMetric]:
    return list(session.scalars(select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)))


# --- a worker's lease ----------------------------------------------------------------------


def _owned(lease: Lease) -> Update:
    return update(Job).where(Job.id == lease.job_id, Job.worker == lease.worker)


def _write(session: Session, lease: Lease, **values: Any) -> bool:
    return session.execute(_owned(lease).values(**values)).rowcount == 1  # type: ignore[attr-defined]


def claim(session: Session, job_id: str, worker: str, *, is_stale: Callable[[Job], bool]) -> Job | None:
    """Take a queued job (or one whose worker is gone) with a compare-and-set on (status, attempts):
    however many copies of its message arrive, one worker wins."""
    job = session.get(Job, job_id)
    if job is None or job.cancel_requested:
        return None
    if job.status in LEASED_STATUSES and is_stale(job):
        if release(session, job, f"worker {job.worker} stopped responding") != JobStatus.QUEUED:
            return None
        session.refresh(job)
    if job.status != JobStatus.QUEUED:
        return None
    if job.attempts >= job.max_attempts:
        release(session, job, "its worker was lost each time")
        return None
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempts == job.attempts)
        .values(
            status=JobStatus.RUNNING,
            phase="starting",
            worker=worker,
            attempts=job.attempts + 1,
            started_at=job.started_at or now,
            heartbeat_at=now,
            error=None,
        )
    ).rowcount  # type: ignore[attr-defined]
    if claimed != 1:
        return None
    session.flush()
    session.refresh(job)
    return job


@dataclass(frozen=True)
class LeaseState:
    owned: bool
    cancel_requested: bool


def heartbeat(session: Session, lease: Lease) -> LeaseState:
    """Prove the worker is alive; learn whether the job was cancelled or taken over."""
    owned = _write(session, lease, heartbeat_at=utcnow())
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == lease.job_id))
    return LeaseState(owned, bool(cancel))


def lease_state(session: Session, lease: Lease) -> LeaseState:
    """Whether the worker still owns the job and whether a cancel was asked: one read by primary key."""
    row = session.execute(select(Job.worker, Job.cancel_requested).where(Job.id == lease.job_id)).one_or_none()
    return LeaseState(row is not None and row.worker == lease.worker, bool(row and row.cancel_requested))


def report_stage(session: Session, lease: Lease, status: JobStatus, phase: str) -> bool:
    """running ↔ evaluating, from the engine's typed stage; the phase says what exactly, for the user."""
    assert status in LEASED_STATUSES
    return _write(session, lease, status=status, phase=phase[:128])


def report_progress(session: Session, lease: Lease, progress: dict[str, Any], phase: str | None = None) -> bool:
    values: dict[str, Any] = {"progress": progress}
    if phase is not None:
        values["phase"] = phase[:128]
    return _write(session, lease, **values)


def record_epochs(
    session: Session,
    lease: Lease,
    attempt: int,
    records: list[dict[str, Any]],
    *,
    latest: dict[str, Any] | None = None,
    best: dict[str, Any] | None = None,
    replace: bool = True,
) -> bool:
    """One metrics row per epoch, so a resumed job never duplicates an epoch. replace=False only fills in
    epochs that are missing (a checkpoint written just before a crash)."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    if latest is not None:
        values["latest_metrics"] = latest
    if best is not None:
        values["best_metrics"] = best
    if not _write(session, lease, **values):
        return False
    epochs = [r["epoch"] for r in records]
    existing = (EpochMetric.job_id == lease.job_id, EpochMetric.epoch.in_(epochs))
    present: set[int] = set()
    if replace:
        session.execute(delete(EpochMetric).where(*existing))
    else:
        present = set(session.scalars(select(EpochMetric.epoch).where(*existing)))
    session.add_all(
        EpochMetric(job_id=lease.job_id, epoch=r["epoch"], attempt=attempt, record=r) for r in records if r["epoch"] not in present
    )
    return True


def _replace_artifacts(session: Session, job_id: str, artifacts: Iterable[ArtifactFile]) -> None:
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.add_all(Artifact(job_id=job_id, **vars(a)) for a in artifacts)


def succeed(
    session: Session,
    lease: Lease,
    *,
    result: dict[str, Any],
    best: dict[str, Any],
    evaluation: dict[str, Any],
    warnings: list[dict[str, str]],
    execution: dict[str, Any],
    artifacts: Iterable[ArtifactFile],
) -> bool:
    phase = "succeeded" if evaluation.get("status") == "complete" else "succeeded; the evaluation is incomplete"
    if not _write(
        session,
        lease,
        status=JobStatus.SUCCEEDED,
        phase=phase,
        finished_at=utcnow(),
        result=result,
        best_metrics=best,
        evaluation=evaluation,
        warnings=warnings,
        execution=execution,
        error=None,
    ):
        return False
    _replace_artifacts(session, lease.job_id, artifacts)
    return True


def finish(
    session: Session,
    lease: Lease,
    status: JobStatus,
    *,
    error: str | None = None,
    phase: str | None = None,
    artifacts: Iterable[ArtifactFile] = (),
) -> bool:
    """End a job as failed or cancelled, keeping whatever artifacts could be saved."""
    assert status in (JobStatus.FAILED, JobStatus.CANCELLED)
    if not _write(session, lease, status=status, phase=(phase or status.value)[:128], finished_at=utcnow(), error=error):
        return False
    _replace_artifacts(session, lease.job_id, artifacts)
    return True


# --- recovery (the reconciler) -------------------------------------------------------------


def leased(session: Session) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.status.in_(LEASED_STATUSES))))


def release(session: Session, job: Job, reason: str) -> JobStatus | None:
    """A job whose worker is gone: cancelled if a cancel was asked, failed once its attempts are spent,
    otherwise queued again to resume from its checkpoint. None if the job changed meanwhile."""
    same_worker = Job.worker.is_(None) if job.worker is None else Job.worker == job.worker
    unchanged = (Job.id == job.id, Job.status == job.status, Job.attempts == job.attempts, same_worker)
    now = utcnow()
    values: dict[str, Any]
    if job.cancel_requested:
        values = {"status": JobStatus.CANCELLED, "phase": "cancelled", "finished_at": now}
    elif job.attempts >= job.max_attempts:
        values = {
            "status": JobStatus.FAILED,
            "phase": "failed",
            "finished_at": now,
            "error": f"gave up after {job.attempts} attempts: {reason}",
        }
    else:
        values = {"status": JobStatus.QUEUED, "phase": f"re-queued: {reason}"[:128], "enqueued_at": None}
    if session.execute(update(Job).where(*unchanged).values(**values)).rowcount != 1:  # type: ignore[attr-defined]
        return None
    return JobStatus(values["status"])


def due_for_delivery(session: Session, sent_before: dt.datetime) -> list[str]:
    """Queued jobs whose message may be lost: never sent, or sent long ago and still not claimed."""
    return list(
        session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED, or_(Job.enqueued_at.is_(None), Job.enqueued_at < sent_before)))
    )
