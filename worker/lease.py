"""A worker's hold on a job: who it is, whether a job's worker is gone, and the lease itself — the
guarded, retried database writes of the job's owner and the heartbeat that keeps the lease alive."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from core.db import jobs
from core.db.models import Job
from core.db.session import Database, database
from core.settings import Settings

log = logging.getLogger(__name__)
StopReason = Literal["cancel", "lease-lost", "time-limit", "memory-limit"]


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


def is_stale(job: Job, settings: Settings, now: dt.datetime) -> bool:
    """The job's worker stopped heart-beating (`now` and the heartbeat both by the database's clock), or its
    process on this host is gone."""
    beat = job.heartbeat_at or job.started_at
    return beat is None or (now - beat).total_seconds() > settings.heartbeat_timeout or owner_is_dead(job.worker)


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def host_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class JobLimits:
    """What one job may take: a deadline (monotonic seconds) and a ceiling on its process's resident memory."""

    deadline: float
    max_memory_bytes: int

    def exceeded(self) -> StopReason | None:
        if time.monotonic() > self.deadline:
            return "time-limit"
        if resident_bytes() > self.max_memory_bytes:
            return "memory-limit"
        return None


class JobLease:
    """Held while a worker runs a job: `write` applies a transition of core.db.jobs under the lease
    (retrying through database outages); a heartbeat thread proves liveness every interval, learns of a
    cancel request or a lost lease, and watches the job's limits; `stop_reason` then reports which."""

    WATCH_INTERVAL = 0.5

    def __init__(self, db: Database, lease: jobs.Lease, heartbeat_interval: float, limits: JobLimits):
        self.db = db
        self.lease = lease
        self.heartbeat_interval = heartbeat_interval
        self.limits = limits
        self.stop_reason: StopReason | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def job_id(self) -> str:
        return self.lease.job_id

    @property
    def attempt(self) -> int:
        return self.lease.attempt

    def write(self, transition: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
        def work(session: Session) -> bool:
            return transition(session, self.lease, *args, **kwargs)

        done = self.db.run(work, retry=True)
        if not done:
            self.stop_reason = "lease-lost"
        return done

    def __enter__(self) -> JobLease:
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        """Every WATCH_INTERVAL: the limits, and whether the job was cancelled (so a cancel stops it within a
        step); every heartbeat_interval, the heartbeat itself (the one write)."""
        next_beat = 0.0
        while not self._stopped.is_set():
            if self.stop_reason is None and (exceeded := self.limits.exceeded()):
                self.stop_reason = exceeded
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat = time.monotonic() + self.heartbeat_interval
            self._check(jobs.heartbeat if beat else jobs.lease_state)
            self._stopped.wait(min(self.WATCH_INTERVAL, self.heartbeat_interval))

    def _check(self, transition: Callable[[Session, jobs.Lease], jobs.LeaseState]) -> None:
        try:
            state = self.db.run(lambda session: transition(session, self.lease), retry=True)
        except Exception:  # the database is gone for longer than the retries: keep training, try again
            log.exception("heartbeat for job %s failed", self.job_id)
            return
        if not state.owned:
            self.stop_reason = "lease-lost"
        elif state.cancel_requested and self.stop_reason is None:
            self.stop_reason = "cancel"

    def should_stop(self) -> bool:
        return self.stop_reason is not None


def claim(settings: Settings, job_id: str) -> tuple[Database, jobs.Lease, Job] | None:
    """Claim the job for this worker process: (the database, the lease, the job), or None if it is not
    claimable (already owned, finished or cancelled). The database alone, no engine: a duplicate message
    costs a worker one short transaction."""
    db = database(settings.resolved_database_url)
    me = worker_name()
    job = db.run(lambda session: jobs.claim(session, job_id, me, is_stale=lambda j, now: is_stale(j, settings, now)), retry=True)
    if job is None:
        log.info("job %s not claimable by %s (already owned, finished or cancelled); message dropped", job_id, me)
        return None
    return db, jobs.Lease(job_id, me, job.attempts), job


def give_back(claimed: tuple[Database, jobs.Lease, Job], reason: str) -> None:
    """A job this worker claimed but cannot run, released as its worker's loss would release it (queued again,
    or failed once its attempts are spent, or cancelled if asked), without waiting for its heartbeat to age."""
    db, _lease, job = claimed
    db.run(lambda session: jobs.release(session, job, reason), retry=True)
