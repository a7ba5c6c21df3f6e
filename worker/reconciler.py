"""The database is the source of truth; the broker only carries wake-up calls. Each worker runs
this pass every reconcile_interval seconds (and once at start):

- a running job whose worker stopped heart-beating (or whose process is gone) goes back to the
  queue, until max_attempts, then fails with a clear reason;
- a queued job whose message may be lost (never sent, a broker restart, a worker killed before
  it acknowledged) is sent again. Duplicate messages are harmless: only one claim succeeds."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import or_, select, update

from core.db.models import Job, utcnow
from core.db.session import session_scope
from core.settings import Settings

from .celery_app import enqueue_job
from .runner import is_stale

log = logging.getLogger(__name__)


def reconcile(settings: Settings) -> dict[str, int]:
    url = settings.resolved_database_url
    counts = {"requeued_lost_workers": 0, "failed_lost_workers": 0, "resent_messages": 0}
    now = utcnow()
    with session_scope(url) as session:
        running = session.scalars(select(Job).where(Job.status.in_(("running", "evaluating")))).all()
        for job in running:
            if not is_stale(job, settings, now):
                continue
            guard = (Job.id == job.id, Job.status == job.status, Job.attempts == job.attempts, Job.worker == job.worker)
            if job.cancel_requested:
                values = dict(status="cancelled", phase="cancelled", finished_at=now)
            elif job.attempts >= job.max_attempts:
                values = dict(status="failed", phase="failed", finished_at=now,
                              error=f"gave up after {job.attempts} attempts: the worker stopped responding each time")
                counts["failed_lost_workers"] += 1
            else:
                values = dict(status="queued", phase=f"re-queued: worker {job.worker} stopped responding", enqueued_at=None)
                counts["requeued_lost_workers"] += 1
            session.execute(update(Job).where(*guard).values(**values))
        resend_before = now - dt.timedelta(seconds=settings.requeue_after)
        queued = session.scalars(
            select(Job.id).where(Job.status == "queued", or_(Job.enqueued_at.is_(None), Job.enqueued_at < resend_before))
        ).all()
    for job_id in queued:
        if enqueue_job(settings, job_id):
            counts["resent_messages"] += 1
    if any(counts.values()):
        log.info("reconciler: %s", counts)
    return counts


def start_reconciler(settings: Settings) -> threading.Event:
    """Run reconcile() in a daemon thread until the returned event is set."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                reconcile(settings)
            except Exception:  # a database or broker outage: try again next round
                log.exception("reconciler pass failed")
            stop.wait(settings.reconcile_interval)

    threading.Thread(target=loop, name="reconciler", daemon=True).start()
    return stop
