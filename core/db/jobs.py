"""Every write to a job row, one named transition each. Nothing else updates `jobs`.

A worker owns a job while the job is running or evaluating under that worker's name and attempt (its
lease). Each write a worker makes is guarded by the whole lease (`_owned`), so a worker that lost its
job — to the reconciler or to another worker after a long pause — can no longer change it, even if it
is given the same job again later. Transitions return whether they took effect.

Every transition is a compare-and-set on every field it decided on (status, owner, attempt, the cancel
request, the heartbeat it judged stale), so a decision made on a row that changed meanwhile does
nothing. Times that are compared with each other (heartbeats, messages sent) come from the database's
clock (`database_now`), never from the clocks of the hosts that write them.

The states, and who moves a job between them:
- queued (no owner) → running: a worker's `claim`; → cancelled: the user's `request_cancel` (or a claim
  finding a cancel already asked, which no transition leaves). A queued job is always claimable or ended.
- running ⇄ evaluating (owned): the worker; → succeeded / failed / cancelled: the worker (`succeed`,
  `finish`); → queued (owner cleared), failed or cancelled: `release`, once its worker stopped responding.
- A queued job's message is sent again (`due_for_delivery`) only with a growing interval while nothing
  changes: a job waiting behind busy workers is not sent without bound."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Update, case, delete, func, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FunctionElement

from .models import (
    ACTIVE_STATUSES,
    LEASED_STATUSES,
    TERMINAL_STATUSES,
    Artifact,
    EpochMetric,
    Job,
    JobStatus,
    UTCDateTime,
    utcnow,
)


class database_now(FunctionElement):  # an SQL function, named as one
    """The database's clock, as naive UTC like every stored time: the one clock heartbeats and sends are judged by."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(database_now)
def _now_postgresql(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "(statement_timestamp() AT TIME ZONE 'utc')"


@compiles(database_now, "sqlite")
def _now_sqlite(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"  # microseconds, as SQLAlchemy stores them


def clock(session: Session) -> dt.datetime:
    """The database's time now (aware UTC)."""
    now = session.scalar(select(database_now()))
    assert now is not None
    return now


# A queued job's message is sent again after requeue_after, then after twice that, and so on up to this:
# a lost message is replaced within the hour, and a job waiting behind busy workers gets one copy per hour.
MAX_RESEND_INTERVAL = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Lease:
    """A worker's ownership of a job: its name and the attempt it claimed."""

    job_id: str
    worker: str
    attempt: int


@dataclass(frozen=True)
class ArtifactRecord:
    """One published file of a job, as its artifacts row holds it (the file lies at `storage_key`)."""

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


def create(session: Session, *, tenant_id: str, max_active: int, **fields: Any) -> Job:
    """A new queued job, unless the tenant already has `max_active` queued or running ones.
    Call `core.db.tenants.lock_tenant` first in the same transaction."""
    active = session.scalar(select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))) or 0
    if active >= max_active:
        raise ActiveJobLimit(active, max_active)
    job = Job(tenant_id=tenant_id, status=JobStatus.QUEUED, **fields)
    session.add(job)
    session.flush()
    return job


def mark_enqueued(session: Session, job_id: str) -> None:
    """A message for the queued job was sent: when (the database's clock) and how many since it was last queued."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(enqueued_at=database_now(), sends=Job.sends + 1)
    )


def _if_queued(value: Any, otherwise: Any) -> Any:
    return case((Job.status == JobStatus.QUEUED, value), else_=otherwise)


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one is flagged, and its worker stops at its next check.
    One statement, so that no claim or release in between can leave the cancel half done."""
    changed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(ACTIVE_STATUSES))
        .values(
            cancel_requested=True,
            status=_if_queued(JobStatus.CANCELLED.value, Job.status),
            phase=_if_queued("cancelled before it started", Job.phase),
            finished_at=_if_queued(database_now(), Job.finished_at),
        )
    ).rowcount  # type: ignore[attr-defined]
    session.refresh(job)
    if changed != 1:
        raise JobFinished(job)
    return job


def delete_finished(session: Session, job: Job) -> None:
    if job.status not in TERMINAL_STATUSES:
        raise JobActive(job)
    session.delete(job)


def artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def epochs(session: Session, job_id: str) -> list[EpochMetric]:
    return list(session.scalars(select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)))


# --- a worker's lease ----------------------------------------------------------------------


def _owned(lease: Lease) -> Update:
    return update(Job).where(
        Job.id == lease.job_id, Job.worker == lease.worker, Job.attempts == lease.attempt, Job.status.in_(LEASED_STATUSES)
    )


def _write(session: Session, lease: Lease, **values: Any) -> bool:
    return session.execute(_owned(lease).values(**values)).rowcount == 1  # type: ignore[attr-defined]


def _unchanged(job: Job) -> tuple[ColumnElement[bool], ...]:
    """The row still as `job` was read: every field a transition decides on."""

    def same(column: Any, value: Any) -> ColumnElement[bool]:
        return column.is_(None) if value is None else column == value

    return (
        Job.id == job.id,
        Job.status == job.status,
        Job.attempts == job.attempts,
        same(Job.worker, job.worker),
        Job.cancel_requested == job.cancel_requested,
        same(Job.heartbeat_at, job.heartbeat_at),
    )


def _compare_and_set(session: Session, job: Job, **values: Any) -> bool:
    return session.execute(update(Job).where(*_unchanged(job)).values(**values)).rowcount == 1  # type: ignore[attr-defined]


def claim(session: Session, job_id: str, worker: str, *, is_stale: Callable[[Job, dt.datetime], bool]) -> Job | None:
    """Take a queued job (or one whose worker is gone: `is_stale(job, the database's time)`) with a
    compare-and-set: however many copies of its message arrive, one worker wins. A queued job with a
    cancel asked is cancelled here, never left for its message to come back."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status in LEASED_STATUSES and is_stale(job, clock(session)):
        if release(session, job, f"worker {job.worker} stopped responding") != JobStatus.QUEUED:
            return None
        session.refresh(job)
    if job.status != JobStatus.QUEUED:
        return None
    if job.cancel_requested or job.attempts >= job.max_attempts:
        release(session, job, "its worker was lost each time")
        return None
    claimed = _compare_and_set(
        session,
        job,
        status=JobStatus.RUNNING,
        phase="starting",
        worker=worker,
        attempts=job.attempts + 1,
        started_at=func.coalesce(Job.started_at, database_now()),
        heartbeat_at=database_now(),
        sends=0,
        error=None,
    )
    if not claimed:
        return None
    session.flush()
    session.refresh(job)
    return job


@dataclass(frozen=True)
class LeaseState:
    owned: bool
    cancel_requested: bool


def heartbeat(session: Session, lease: Lease) -> LeaseState:
    """Prove the worker is alive (stamped with the database's clock); learn whether the job was cancelled or taken over."""
    owned = _write(session, lease, heartbeat_at=database_now())
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == lease.job_id))
    return LeaseState(owned, bool(cancel))


def lease_state(session: Session, lease: Lease) -> LeaseState:
    """Whether the worker still owns the job and whether a cancel was asked: one read by primary key."""
    row = session.execute(select(Job.worker, Job.attempts, Job.status, Job.cancel_requested).where(Job.id == lease.job_id)).one_or_none()
    owned = row is not None and row.worker == lease.worker and row.attempts == lease.attempt and row.status in LEASED_STATUSES
    return LeaseState(owned, bool(row and row.cancel_requested))


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
        EpochMetric(job_id=lease.job_id, epoch=r["epoch"], attempt=lease.attempt, record=r) for r in records if r["epoch"] not in present
    )
    return True


def _replace_artifacts(session: Session, job_id: str, artifacts: Iterable[ArtifactRecord]) -> None:
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
    artifacts: Iterable[ArtifactRecord],
) -> bool:
    phase = "succeeded" if evaluation.get("status") == "complete" else "succeeded; the evaluation is incomplete"
    if not _write(
        session,
        lease,
        status=JobStatus.SUCCEEDED,
        phase=phase,
        finished_at=database_now(),
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
    artifacts: Iterable[ArtifactRecord] = (),
) -> bool:
    """End a job as failed or cancelled, keeping whatever artifacts could be saved."""
    assert status in (JobStatus.FAILED, JobStatus.CANCELLED)
    if not _write(session, lease, status=status, phase=(phase or status.value)[:128], finished_at=database_now(), error=error):
        return False
    _replace_artifacts(session, lease.job_id, artifacts)
    return True


# --- recovery (the reconciler) -------------------------------------------------------------


def leased(session: Session) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.status.in_(LEASED_STATUSES))))


def release(session: Session, job: Job, reason: str) -> JobStatus | None:
    """A job no worker holds any more (its worker is gone, or it is queued and can never be claimed):
    cancelled if a cancel was asked, failed once its attempts are spent, otherwise queued again, with no
    owner, to resume from its checkpoint. None if the job changed since it was read."""
    values: dict[str, Any]
    if job.cancel_requested:
        values = {"status": JobStatus.CANCELLED, "phase": "cancelled", "finished_at": database_now()}
    elif job.attempts >= job.max_attempts:
        values = {
            "status": JobStatus.FAILED,
            "phase": "failed",
            "finished_at": database_now(),
            "error": f"gave up after {job.attempts} attempts: {reason}",
        }
    else:
        values = {"status": JobStatus.QUEUED, "phase": f"re-queued: {reason}"[:128], "enqueued_at": None, "sends": 0}
    if not _compare_and_set(session, job, worker=None, heartbeat_at=None, **values):
        return None
    return JobStatus(values["status"])


def resend_interval(sends: int, requeue_after: dt.timedelta) -> dt.timedelta:
    """How long a queued job waits for a claim after its `sends`-th message before another is sent."""
    doubled = requeue_after.total_seconds() * 2.0 ** min(max(0, sends - 1), 64)
    return min(dt.timedelta(seconds=min(doubled, 1e9)), max(requeue_after, MAX_RESEND_INTERVAL))


def due_for_delivery(session: Session, now: dt.datetime, requeue_after: dt.timedelta) -> list[str]:
    """Queued jobs whose message may be lost: never sent, or sent and still not claimed after the interval
    `resend_interval` gives (doubling with each message sent since the job last changed)."""
    rows = session.execute(
        select(Job.id, Job.enqueued_at, Job.sends).where(Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
    )
    return [r.id for r in rows if r.enqueued_at is None or r.enqueued_at < now - resend_interval(r.sends, requeue_after)]
