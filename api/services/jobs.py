"""Submitting a job: idempotency, the spec, the dataset, the tenant's limit and the enqueue, with the
limit and the dataset reference enforced inside one locked transaction."""

from __future__ import annotations

import hashlib
import json
import re

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import datasets, jobs
from core.db.models import Dataset, Job
from core.db.session import Database
from core.db.tenants import TenantContext
from core.engine.models import get_model_info
from core.engine.sources import BUILTIN_DATASETS
from core.engine.spec import JobSpec, build_spec
from core.settings import Settings
from worker.queue import JobQueue

from ..errors import field_errors
from ..schemas import PRINTABLE, JobCreate


def submit(
    db: Database, queue: JobQueue, settings: Settings, tenant: TenantContext, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """The job (new, or the one this Idempotency-Key already made) and whether it was created now."""
    request_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True).encode()).hexdigest()
    if idempotency_key and (replay := db.run(lambda session: _earlier(session, tenant, idempotency_key))) is not None:
        return _replay(replay, request_hash), False
    overrides = body.spec.model_dump(mode="json", exclude_unset=True)
    if body.dataset is not None:
        overrides["dataset"] = body.dataset
    spec = build_spec(body.preset, overrides)

    def create(session: Session) -> tuple[Job, bool]:
        jobs.lock_tenant(session, tenant.id)
        if idempotency_key and (existing := _earlier(session, tenant, idempotency_key)) is not None:
            return _replay(existing, request_hash), False  # a concurrent retry won the race
        dataset = _resolve_dataset(session, tenant, spec.dataset)
        _check_architectures_fit(spec, dataset)
        job = jobs.create(
            session, tenant_id=tenant.id, max_active=tenant.max_concurrent_jobs or settings.tenant_max_concurrent_jobs,
            dataset_id=dataset.id if dataset else None, dataset_name=dataset.name if dataset else spec.dataset,
            preset=body.preset, spec=spec.model_dump(mode="json"), max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key, request_hash=request_hash,
        )
        return job, True

    job, created = db.run(create)
    if created:
        queue.enqueue(db, job.id)
        job = db.run(lambda session: session.get_one(Job, job.id))
    return job, created


def _earlier(session: Session, tenant: TenantContext, idempotency_key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))


def _replay(existing: Job, request_hash: str) -> Job:
    if existing.request_hash != request_hash:
        raise HTTPException(status.HTTP_409_CONFLICT, "Idempotency-Key was already used for a different request; use a new key")
    return existing


def _resolve_dataset(session: Session, tenant: TenantContext, reference: str) -> Dataset | None:
    """None for a built-in; else this tenant's upload with that id, or else with that name (which must be
    unambiguous), locked against deletion until the job is stored."""
    if reference in BUILTIN_DATASETS:
        return None
    if not re.fullmatch(PRINTABLE, reference):
        raise field_errors([("dataset", "must be printable text: no NUL or other control characters")])
    dataset = datasets.lock(session, reference)
    if dataset is not None and dataset.tenant_id == tenant.id:
        return dataset
    named = datasets.named(session, tenant.id, reference)
    if len(named) > 1:
        raise field_errors([("dataset", f"{len(named)} of your datasets are named '{reference}' ({', '.join(d.id for d in named)}): "
                                        "use the id of the one you mean")])
    if not named:
        raise field_errors([("dataset", f"unknown dataset '{reference}': use a built-in ({', '.join(BUILTIN_DATASETS)}), "
                                        "or the id or name of one of your uploads")])
    return datasets.lock(session, named[0].id)


def _check_architectures_fit(spec: JobSpec, dataset: Dataset | None) -> None:
    if dataset is None:
        return
    size = min(dataset.input_shape[1:])
    for field, name in (("student", spec.student), ("peer", spec.peer_architecture)):
        minimum = get_model_info(name).min_input_size if name else 0
        if size < minimum:
            raise field_errors([(field, f"{name} needs inputs of at least {minimum}×{minimum}; dataset {dataset.id} has {size}×{size}")])
