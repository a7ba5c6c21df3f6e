"""Files no database row points at: uploads cut off mid-stream (`*.partial`), uploads stored but never
recorded (the API stopped between the two), and files of deleted jobs whose removal was interrupted.
The API sweeps at start-up and periodically; `peeraid-service sweep` does it by hand.

Only files untouched for a while are removed, so an upload still arriving or being validated is safe."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select

from .db.models import Dataset, Job
from .db.session import Database
from .storage import PARTIAL_SUFFIX, Storage

log = logging.getLogger(__name__)


def _idle_for(folder: Path, now: float) -> float:
    """Seconds since anything in `folder` was last written."""
    newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
    return now - newest


def sweep_orphans(db: Database, storage: Storage, *, partial_after: float = 600, orphan_after: float = 3600) -> dict[str, int]:
    now = time.time()
    dataset_ids = set(db.run(lambda session: session.scalars(select(Dataset.id)).all()))
    job_ids = set(db.run(lambda session: session.scalars(select(Job.id)).all()))
    removed = {"partial_uploads": 0, "unrecorded_uploads": 0, "deleted_jobs_files": 0}
    for folder in storage.root.glob("datasets/*/*"):
        for partial in folder.glob(f"*{PARTIAL_SUFFIX}"):
            if now - partial.stat().st_mtime > partial_after:
                partial.unlink(missing_ok=True)
                removed["partial_uploads"] += 1
        if folder.name not in dataset_ids and _idle_for(folder, now) > orphan_after:
            shutil.rmtree(folder, ignore_errors=True)
            removed["unrecorded_uploads"] += 1
    for folder in storage.root.glob("jobs/*"):
        if folder.name not in job_ids and _idle_for(folder, now) > orphan_after:
            shutil.rmtree(folder, ignore_errors=True)
            removed["deleted_jobs_files"] += 1
    if any(removed.values()):
        log.info("swept files no row points at: %s", removed)
    return removed
