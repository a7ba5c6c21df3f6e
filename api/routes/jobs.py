"""Robustification jobs: create, list, inspect, follow, cancel, delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Dataset, EpochMetric, Job, Tenant, utcnow
from core.db.session import session_factory
from core.engine.sources import BUILTIN_DATASETS
from core.engine.models import get_model_info
from core.engine.errors import SpecError
from core.engine.spec import build_spec
from worker.celery_app import enqueue_job

from ..deps import SessionDep, SettingsDep, StorageDep, TenantDep
from ..errors import field_errors
from ..schemas import EpochMetricOut, JobCreate, JobList, JobOut, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger(__name__)


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:  # another tenant's job does not exist for you
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


def _resolve_dataset(session: Session, tenant: Tenant, name: str) -> Dataset | None:
    if name in BUILTIN_DATASETS:
        return None
    dataset = session.get(Dataset, name)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise field_errors(
            [("dataset", f"unknown dataset '{name}': use a built-in ({', '.join(BUILTIN_DATASETS)}) or the id of one of your uploads")],
            status.HTTP_422_UNPROCESSABLE_CONTENT,
        )
    return dataset


def _check_architectures_fit(spec, dataset: Dataset | None) -> None:
    if dataset is None:
        return
    size = min(dataset.input_shape[1:])
    for field, name in (("student", spec.student), ("peer", spec.peer_architecture)):
        minimum = get_model_info(name).min_input_size if name else 0
        if size < minimum:
            raise field_errors(
                [(field, f"{name} needs inputs of at least {minimum}×{minimum}; dataset {dataset.id} has {size}×{size}")],
                status.HTTP_422_UNPROCESSABLE_CONTENT,
            )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut, summary="Submit a robustification job")
def create_job(
    body: JobCreate,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=256, description="retries with the same key return the same job")] = None,
) -> Job:
    request_hash = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            return _replay(existing, request_hash, response)

    overrides = dict(body.spec)
    if body.dataset is not None:
        overrides["dataset"] = body.dataset
    try:
        spec = build_spec(body.preset, overrides)
    except SpecError as err:
        raise field_errors([(e["field"], e["message"]) for e in err.errors], status.HTTP_422_UNPROCESSABLE_CONTENT) from None
    dataset = _resolve_dataset(session, tenant, spec.dataset)
    _check_architectures_fit(spec, dataset)

    limit = tenant.max_concurrent_jobs or settings.tenant_max_concurrent_jobs
    active = session.scalar(select(func.count()).where(Job.tenant_id == tenant.id, Job.status.in_(ACTIVE_STATUSES)))
    if active >= limit:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"tenant limit reached: {active} jobs queued or running (limit {limit}); wait for one to finish or cancel one",
            headers={"Retry-After": "60"},
        )

    job = Job(
        tenant_id=tenant.id,
        dataset_id=dataset.id if dataset else None,
        dataset_name=dataset.name if dataset else spec.dataset,
        preset=body.preset,
        spec=spec.model_dump(mode="json"),
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent retry with the same Idempotency-Key won the race
        session.rollback()
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is None:
            raise
        return _replay(existing, request_hash, response)
    enqueue_job(settings, job.id)
    session.refresh(job)
    return job


def _replay(existing: Job, request_hash: str, response: Response) -> Job:
    if existing.request_hash != request_hash:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "Idempotency-Key was already used for a different request; use a new key"
        )
    response.status_code = status.HTTP_200_OK
    return existing


@router.get("", response_model=JobList, summary="List your jobs, newest first")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobList:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status_filter:
        query = query.where(Job.status == status_filter)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    items = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return JobList(items=[JobOut.model_validate(j) for j in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, summary="Status, progress, metrics and error of a job")
def read_job(job_id: str, session: SessionDep, tenant: TenantDep) -> Job:
    return get_job(session, tenant, job_id)


@router.get("/{job_id}/metrics", response_model=list[EpochMetricOut], summary="Per-epoch metrics")
def job_metrics(job_id: str, session: SessionDep, tenant: TenantDep) -> list[EpochMetric]:
    job = get_job(session, tenant, job_id)
    return list(session.scalars(select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch)))


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> Job:
    job = get_job(session, tenant, job_id)
    if job.status in TERMINAL_STATUSES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
    if job.status == "queued":
        job.status, job.phase, job.finished_at = "cancelled", "cancelled before it started", utcnow()
    job.cancel_requested = True
    session.commit()
    return job


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a finished job and its files")
def delete_job(job_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep) -> Response:
    job = get_job(session, tenant, job_id)
    if job.status not in TERMINAL_STATUSES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {job.status}; cancel it first")
    session.delete(job)
    session.commit()
    storage.delete_job(job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{job_id}/events",
    summary="Server-sent events: the job's state whenever it changes, until it finishes",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(job_id: str, request: Request, tenant: TenantDep, settings: SettingsDep) -> StreamingResponse:
    url = settings.resolved_database_url

    def snapshot() -> dict | None:
        with session_factory(url)() as session:
            job = session.get(Job, job_id)
            if job is None or job.tenant_id != tenant.id:
                return None
            return JobOut.model_validate(job).model_dump(mode="json")

    first = await run_in_threadpool(snapshot)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")

    async def stream():
        state, last_sent, idle = first, None, 0.0
        while True:
            if state is None:
                yield "event: deleted\ndata: {}\n\n"
                return
            if state["updated_at"] != last_sent:
                last_sent = state["updated_at"]
                yield f"event: job\ndata: {json.dumps(state)}\n\n"
                idle = 0.0
                if state["status"] in TERMINAL_STATUSES:
                    yield f"event: end\ndata: {json.dumps({'status': state['status']})}\n\n"
                    return
            elif idle >= 15:
                yield ": keep-alive\n\n"
                idle = 0.0
            if await request.is_disconnected():
                return
            await asyncio.sleep(1.0)
            idle += 1.0
            state = await run_in_threadpool(snapshot)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
