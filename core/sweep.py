"""Files no database row points at: uploads cut off mid-stream (`*.partial`), uploads stored but never
recorded (the API stopped between the two), and files of deleted jobs whose removal was interrupted.
The API sweeps at start-up and periodically; `peeraid-service sweep` does it by hand.

An upload in progress is judged by its lease (core/storage.py: refreshed by the API process receiving it,
validating it and recording it), never by its files' age: a trickle of bytes may not move a file's mtime
for minutes. Its files are left alone whatever the thresholds. Without a live lease (its process stopped),
files are removed once untouched for a while."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select

from .db.models import Dataset, Job
from .db.session import Database
from .storage import PARTIAL_SUFFIX, UPLOAD_LEASE_EXPIRY, UPLOADS_IN_PROGRESS, Storage

log = logging.getLogger(__name__)


def _idle_for(folder: Path, now: float) -> float:
    """Seconds since anything in `folder` was last written."""
    newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
    return now - newest


def sweep_orphans(
    db: Database, storage: Storage, *, partial_after: float = 600, orphan_after: float = 3600, lease_expiry: float = UPLOAD_LEASE_EXPIRY
) -> dict[str, int]:
    now = time.time()
    # What is on disk and which uploads are in progress, before the rows are read: an upload records its row
    # before it gives up its lease, and a job has its row before its folder, so a folder listed here that is
    # not in progress and has a row is in the rows read below.
    dataset_folders = [folder for folder in storage.root.glob("datasets/*/*") if folder.is_dir()]
    job_folders = [folder for folder in storage.root.glob("jobs/*") if folder.is_dir()]
    leases = storage.upload_leases()
    in_progress = {dataset_id for dataset_id, age in leases.items() if age <= lease_expiry}
    dataset_ids = set(db.run(lambda session: session.scalars(select(Dataset.id)).all()))
    job_ids = set(db.run(lambda session: session.scalars(select(Job.id)).all()))
    removed = {"partial_uploads": 0, "unrecorded_uploads": 0, "deleted_jobs_files": 0}
    for folder in dataset_folders:
        if folder.name in in_progress:
            continue
        if folder.name not in dataset_ids and _idle_for(folder, now) > orphan_after:
            shutil.rmtree(folder, ignore_errors=True)
            removed["unrecorded_uploads"] += 1
            continue
        for partial in folder.glob(f"*{PARTIAL_SUFFIX}"):
            if now - partial.stat().st_mtime > partial_after:
                partial.unlink(missing_ok=True)
                removed["partial_uploads"] += 1
    for folder in job_folders:
        if folder.name not in job_ids and _idle_for(folder, now) > orphan_after:
            shutil.rmtree(folder, ignore_errors=True)
            removed["deleted_jobs_files"] += 1
    for dataset_id, age in leases.items():
        if age > lease_expiry:  # the process that held it stopped; its files were judged by their age above
            (storage.root / UPLOADS_IN_PROGRESS / dataset_id).unlink(missing_ok=True)
    if any(removed.values()):
        log.info("swept files no row points at: %s", removed)
    return removed
