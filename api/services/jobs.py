"""Submitting a job: the spec, the dataset, a pre-flight check of the two together and an estimate of the
work checked against the deployment's and the tenant's limits, idempotency, and the enqueue — with the
tenant's job limit and the dataset reference enforced inside one locked transaction."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import datasets, jobs
from core.db.models import Dataset, Job
from core.db.session import Database
from core.db.tenants import TenantContext, effective_limits, lock_tenant
from core.engine.builtin_datasets import BUILTIN_DATASETS, BUILTIN_SHAPES
from core.engine.errors import DatasetError, SpecError
from core.engine.estimates import DataShape, Estimate
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


Compute = Callable[[JobSpec, DataShape], Estimate]  # core.engine.preflight.preflight, run in a CPU worker (api.cpu_work)


def plan(db: Database, settings: Settings, tenant: TenantContext, body: JobCreate, compute: Compute) -> Plan:
    """The job as it would run; `compute` makes the estimate (CPU-heavy: the API runs it in a worker process)."""
    spec = _spec(body)
    dataset = db.run(lambda session: _resolve_dataset(session, tenant, spec.dataset))
    return _plan(settings, tenant, spec, dataset, compute)


def _spec(body: JobCreate) -> JobSpec:
    overrides = cast(BaseModel, body.spec).model_dump(mode="json", exclude_unset=True)  # a model built from JobSpec
    if body.dataset is not None:
        overrides["dataset"] = body.dataset
    return build_spec(body.preset, overrides)


def _plan(settings: Settings, tenant: TenantContext, spec: JobSpec, dataset: Dataset | None, compute: Compute) -> Plan:
    if dataset is not None:  # named by its name: the job refers to it by id, which the worker resolves
        spec = spec.model_copy(update={"dataset": dataset.id})
    shape = (
        BUILTIN_SHAPES[spec.dataset]
        if dataset is None
        else DataShape(*_channels_height_width(dataset), len(dataset.classes), dataset.num_train, dataset.num_test)
    )
    try:
        estimate = compute(spec, shape)
    except DatasetError as err:
        raise InvalidFields([("student", str(err))], within=("spec",)) from None
    device = estimate_device(settings)
    return Plan(spec, dataset, shape, device, estimate, admission_refusals(settings, tenant, shape, estimate, device))


def _channels_height_width(dataset: Dataset) -> tuple[int, int, int]:
    channels, height, width = dataset.input_shape  # stored as a JSON list
    return channels, height, width


def estimate_device(settings: Settings) -> str:
    """The device class of the workers, which run the jobs: as set, else from their device setting (a CUDA device is
    estimated as an H100), else, with both on auto, from whether this host has an NVIDIA GPU (the embedded service's
    worker shares the API's host; elsewhere set PEERAID_WORKER_DEVICE or PEERAID_ESTIMATE_DEVICE for the API too)."""
    if settings.estimate_device != "auto":
        return settings.estimate_device
    if settings.worker_device != "auto":
        return "cpu" if settings.worker_device == "cpu" else "h100"
    return "h100" if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()) else "cpu"


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
    compute: Compute,
) -> tuple[Job, bool]:
    """The job (new, or the one this Idempotency-Key already made) and whether it was created now. The dataset is
    resolved once, with the key's earlier job; the transaction that makes the job locks it by its id."""
    request_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True).encode()).hexdigest()
    try:
        spec = _spec(body)
    except SpecError:
        if idempotency_key and (replay := db.run(lambda session: _earlier(session, tenant, idempotency_key))) is not None:
            return _replay(replay, request_hash), False  # a key used for another request: 409, whatever its spec
        raise

    def look_up(session: Session) -> tuple[Job | None, Dataset | None]:
        earlier = _earlier(session, tenant, idempotency_key) if idempotency_key else None
        return earlier, None if earlier is not None else _resolve_dataset(session, tenant, spec.dataset)

    earlier, dataset = db.run(look_up)
    if earlier is not None:
        return _replay(earlier, request_hash), False
    planned = _plan(settings, tenant, spec, dataset, compute)
    if planned.refusals:
        raise InvalidFields(planned.refusals, within=("spec",))

    def create(session: Session) -> tuple[Job, bool]:
        lock_tenant(session, tenant.id)
        if idempotency_key and (existing := _earlier(session, tenant, idempotency_key)) is not None:
            return _replay(existing, request_hash), False  # a concurrent retry won the race
        if dataset is not None and datasets.lock(session, dataset.id) is None:  # locked against deletion until committed
            raise InvalidFields([("dataset", f"dataset '{dataset.name}' ({dataset.id}) was deleted while the job was submitted")])
        job = jobs.create(
            session,
            tenant_id=tenant.id,
            max_active=effective_limits(tenant, settings).concurrent_jobs,
            dataset_id=dataset.id if dataset else None,
            dataset_name=dataset.name if dataset else spec.dataset,
            preset=body.preset,
            spec=planned.spec.model_dump(mode="json"),
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
        made = job
        job = db.run(lambda session: session.get(Job, made.id) or made)
    return job, created


def _earlier(session: Session, tenant: TenantContext, idempotency_key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))


def _replay(existing: Job, request_hash: str) -> Job:
    if existing.request_hash != request_hash:
        raise IdempotencyKeyReused("Idempotency-Key was already used for a different request; use a new key")
    return existing


def _resolve_dataset(session: Session, tenant: TenantContext, reference: str) -> Dataset | None:
    """None for a built-in; else this tenant's upload with that id, or else with that name (unique per tenant)."""
    if reference in BUILTIN_DATASETS:
        return None
    if not re.fullmatch(PRINTABLE, reference):
        raise InvalidFields([("dataset", "must be printable text: no NUL or other control characters")])
    dataset = session.get(Dataset, reference)
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
    return named
