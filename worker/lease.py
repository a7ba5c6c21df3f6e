"""A worker's hold on a job: who it is, whether a job's worker is gone, and the lease itself — the
guarded, retried database writes of the job's owner and the heartbeat that keeps the lease alive."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy.orm import Session

from core.db import jobs
from core.db.models import Job, utcnow
from core.db.session import Database
from core.settings import Settings

log = logging.getLogger(__name__)
StopReason = Literal["cancel", "lease-lost"]


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


def is_stale(job: Job, settings: Settings, now: dt.datetime | None = None) -> bool:
    """The job's worker stopped heart-beating, or its process on this host is gone."""
    now = now or utcnow()
    beat = job.heartbeat_at or job.started_at
    return beat is None or (now - beat).total_seconds() > settings.heartbeat_timeout or owner_is_dead(job.worker)


class JobLease:
    """Held while a worker runs a job: `write` applies a transition of core.db.jobs under the lease
    (retrying through database outages); a heartbeat thread proves liveness every interval and
    learns of a cancel request or a lost lease, which `stop_reason` then reports."""

    def __init__(self, db: Database, lease: jobs.Lease, attempt: int, heartbeat_interval: float):
        self.db = db
        self.lease = lease
        self.attempt = attempt
        self.heartbeat_interval = heartbeat_interval
        self.stop_reason: StopReason | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def job_id(self) -> str:
        return self.lease.job_id

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
        while not self._stopped.is_set():
            try:
                state = self.db.run(lambda session: jobs.heartbeat(session, self.lease), retry=True)
            except Exception:  # the database is gone for longer than the retries: keep training, try again
                log.exception("heartbeat for job %s failed", self.job_id)
            else:
                if not state.owned:
                    self.stop_reason = "lease-lost"
                elif state.cancel_requested:
                    self.stop_reason = "cancel"
            self._stopped.wait(self.heartbeat_interval)

    def should_stop(self) -> bool:
        return self.stop_reason is not None
