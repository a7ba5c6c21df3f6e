"""Submitting a job: the spec, the dataset, a pre-flight check of the two together and an estimate of the
work checked against the deployment's and the tenant's limits, idempotency, and the enqueue — with the
tenant's job limit and the dataset reference enforced inside one locked transaction."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import datasets, jobs
from core.db.models import Dataset, Job
from core.db.session import Database
from core.db.tenants import TenantContext, effective_limits, lock_tenant
from core.engine.errors import DatasetError
from core.engine.preflight import BUILTIN_SHAPES, DataShape, Estimate, preflight
from core.engine.sources import BUILTIN_DATASETS
from core.engine.spec import JobSpec, build_spec
from core.settings import Settings
from worker.queue import JobQueue

from ..schemas import PRINTABLE, JobCreate
from .errors import IdempotencyKeyReused, InvalidFields


@dataclass
class Plan:
    """A job as it would run: its resolved spec and data, the estimate, and any limit it breaks."""

    spec: JobSpec
    dataset: Dataset | None
    shape: DataShape
    device: str
    estimate: Estimate
    refusals: list[tuple[str, str]]  # (spec field, why and how to change it)


Compute = Callable[[JobSpec, DataShape], Estimate]  # core.engine.preflight.preflight, or it run elsewhere (api.cpu_work)


def plan(db: Database, settings: Settings, tenant: TenantContext, body: JobCreate, compute: Compute = preflight) -> Plan:
    """The job as it would run; `compute` makes the estimate (CPU-heavy: the API runs it in a worker process)."""
    overrides = body.spec.model_dump(mode="json", exclude_unset=True)
    if body.dataset is not None:
        overrides["dataset"] = body.dataset
    spec = build_spec(body.preset, overrides)
    dataset = db.run(lambda session: _resolve_dataset(session, tenant, spec.dataset, lock=False))
    if dataset is not None:  # named by its name: the job refers to it by id, which the worker resolves
        spec = spec.model_copy(update={"dataset": dataset.id})
    shape = (
        BUILTIN_SHAPES[spec.dataset]
        if dataset is None
        else DataShape(*dataset.input_shape, num_classes=len(dataset.classes), num_train=dataset.num_train, num_test=dataset.num_test)
    )
    try:
        estimate = compute(spec, shape)
    except DatasetError as err:
        raise InvalidFields([("student", str(err))], within=("spec",)) from None
    device = estimate_device(settings)
    return Plan(spec, dataset, shape, device, estimate, admission_refusals(settings, tenant, shape, estimate, device))


def estimate_device(settings: Settings) -> str:
    if settings.estimate_device != "auto":
        return settings.estimate_device
    return "h100" if torch.cuda.is_available() else "cpu"


def admission_refusals(
    settings: Settings, tenant: TenantContext, shape: DataShape, estimate: Estimate, device: str
) -> list[tuple[str, str]]:
    """Which limits the job would break, each naming the limit and how to change it."""
    refusals = []
    hours, max_hours = estimate.hours[device], effective_limits(tenant, settings).job_hours
    if hours > max_hours:
        refusals.append(
            (
                "epochs",
                f"estimated {hours:,.1f} h on {device} is over your limit of {max_hours:g} h per job: fewer epochs, "
                "a smaller model or less data (the operator sets the limit: set-limits --max-job-hours)",
            )
        )
    if estimate.memory_bytes > settings.max_job_memory_bytes:
        refusals.append(
            (
                "batch_size",
                f"estimated {estimate.memory_bytes / 2**30:,.1f} GiB at this batch size is over the "
                f"{settings.max_job_memory_bytes / 2**30:g} GiB a job may use: a smaller batch_size or "
                "smaller images (PEERAID_MAX_JOB_MEMORY_BYTES)",
            )
        )
    if max(shape.height, shape.width) > settings.max_input_side:
        refusals.append(
            (
                "dataset",
                f"images of {shape.width}×{shape.height} are over the largest side of {settings.max_input_side}: "
                "upload again with resize=WIDTHxHEIGHT (PEERAID_MAX_INPUT_SIDE)",
            )
        )
    if estimate.evaluation_passes > settings.max_evaluation_passes:
        refusals.append(
            (
                "evaluation",
                f"the final report would make {estimate.evaluation_passes:,} passes per model, over "
                f"{settings.max_evaluation_passes:,}: fewer evaluation.n_examples or pgd_steps "
                "(PEERAID_MAX_EVALUATION_PASSES)",
            )
        )
    return refusals


def submit(
    db: Database,
    queue: JobQueue,
    settings: Settings,
    tenant: TenantContext,
    body: JobCreate,
    idempotency_key: str | None,
    compute: Compute = preflight,
) -> tuple[Job, bool]:
    """The job (new, or the one this Idempotency-Key already made) and whether it was created now."""
    request_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True).encode()).hexdigest()
    if idempotency_key and (replay := db.run(lambda session: _earlier(session, tenant, idempotency_key))) is not None:
        return _replay(replay, request_hash), False
    planned = plan(db, settings, tenant, body, compute)
    if planned.refusals:
        raise InvalidFields(planned.refusals, within=("spec",))
    spec = planned.spec

    def create(session: Session) -> tuple[Job, bool]:
        lock_tenant(session, tenant.id)
        if idempotency_key and (existing := _earlier(session, tenant, idempotency_key)) is not None:
            return _replay(existing, request_hash), False  # a concurrent retry won the race
        dataset = _resolve_dataset(session, tenant, spec.dataset, lock=True)
        job = jobs.create(
            session,
            tenant_id=tenant.id,
            max_active=effective_limits(tenant, settings).concurrent_jobs,
            dataset_id=dataset.id if dataset else None,
            dataset_name=dataset.name if dataset else spec.dataset,
            preset=body.preset,
            spec=spec.model_dump(mode="json"),
            max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            estimate={"device": planned.device, **planned.estimate.to_dict()},
        )
        return job, True

    job, created = db.run(create)
    if created:
        queue.enqueue(db, job.id)
        # as it is after the enqueue; a request that cancelled and deleted it meanwhile leaves the one we made
        job = db.run(lambda session, made=job: session.get(Job, made.id) or made)
    return job, created


def _earlier(session: Session, tenant: TenantContext, idempotency_key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))


def _replay(existing: Job, request_hash: str) -> Job:
    if existing.request_hash != request_hash:
        raise IdempotencyKeyReused("Idempotency-Key was already used for a different request; use a new key")
    return existing


def _resolve_dataset(session: Session, tenant: TenantContext, reference: str, *, lock: bool) -> Dataset | None:
    """None for a built-in; else this tenant's upload with that id, or else with that name (unique per
    tenant); with `lock`, locked against deletion until the transaction ends."""
    if reference in BUILTIN_DATASETS:
        return None
    if not re.fullmatch(PRINTABLE, reference):
        raise InvalidFields([("dataset", "must be printable text: no NUL or other control characters")])
    dataset = datasets.lock(session, reference) if lock else session.get(Dataset, reference)
    if dataset is not None and dataset.tenant_id == tenant.id:
        return dataset
    named = datasets.named(session, tenant.id, reference)
    if named is None:
        raise InvalidFields(
            [
                (
                    "dataset",
                    f"unknown dataset '{reference}': use a built-in ({', '.join(BUILTIN_DATASETS)}), "
                    "or the id or name of one of your uploads",
                )
            ]
        )
    return datasets.lock(session, named.id) if lock else named
