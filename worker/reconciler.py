"""The database is the source of truth; the broker only carries wake-up calls. Each worker runs
this pass every reconcile_interval seconds (and once at start):

- a running job whose worker stopped heart-beating (or whose process is gone) goes back to the
  queue, until max_attempts, then fails with a clear reason (core.db.jobs.release);
- a queued job whose message may be lost (never sent, a broker restart, a worker killed before
  it acknowledged) is sent again, with a doubling interval while it stays unclaimed (a job waiting
  behind busy workers is not sent without bound). Duplicate messages are harmless: only one claim
  succeeds, and a worker drops a copy in one short transaction.

Times are judged by the database's clock, so hosts whose clocks differ agree on what is stale."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy.orm import Session

from core.db import jobs
from core.db.models import JobStatus
from core.db.session import database
from core.settings import Settings

from .lease import is_stale
from .queue import JobQueue

log = logging.getLogger(__name__)


def reconcile(settings: Settings, queue: JobQueue) -> dict[str, int]:
    db = database(settings.resolved_database_url)
    counts = {"requeued_lost_workers": 0, "failed_lost_workers": 0, "resent_messages": 0}

    def recover(session: Session) -> list[str]:
        now = jobs.clock(session)
        for job in jobs.leased(session):
            if is_stale(job, settings, now):
                outcome = jobs.release(session, job, f"worker {job.worker} stopped responding")
                if outcome == JobStatus.QUEUED:
                    counts["requeued_lost_workers"] += 1
                elif outcome == JobStatus.FAILED:
                    counts["failed_lost_workers"] += 1
        return jobs.due_for_delivery(session, now, dt.timedelta(seconds=settings.requeue_after))

    for job_id in db.run(recover):
        if queue.enqueue(db, job_id):
            counts["resent_messages"] += 1
    if any(counts.values()):
        log.info("reconciler: %s", counts)
    return counts


def start_reconciler(settings: Settings, queue: JobQueue) -> threading.Event:
    """Run reconcile() in a daemon thread until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                reconcile(settings, queue)
            except Exception:  # a database or broker outage: try again next round
                log.exception("reconciler pass failed")
            stop.wait(settings.reconcile_interval)

    threading.Thread(target=loop, name="reconciler", daemon=True).start()
    return stop
