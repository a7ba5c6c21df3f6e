"""Robustification jobs: submit, list, inspect, follow, cancel, delete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

from core.db import jobs
from core.db.models import EpochMetric, Job, JobStatus
from core.db.tenants import TenantContext

from ..deps import DatabaseDep, JobQueueDep, JobWatcherDep, OwnedJob, SessionDep, SettingsDep, StorageDep, StreamSlotsDep, TenantDep
from ..errors import responses
from ..schemas import EpochMetricOut, EstimateOut, JobCreate, JobList, JobOut, PreflightOut, Refusal
from ..services import jobs as job_service
from ..streams import JobWatcher, TenantSlots

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(401))
KEEP_ALIVE_SECONDS = 15


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut, summary="Submit a robustification job",
             responses={200: {"model": JobOut, "description": "A retry with the same Idempotency-Key: the job it made"}, **responses(409, 413, 422, 429)})
def jobs_create(
    body: JobCreate,
    db: DatabaseDep,
    queue: JobQueueDep,
    tenant: TenantDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=256, description="retries with the same key return the same job")] = None,
) -> Job:
    job, created = job_service.submit(db, queue, settings, tenant, body, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    return job


@router.post("/preflight", response_model=PreflightOut, summary="Check a job against its data and the limits, and estimate it, without submitting it",
             responses=responses(413, 422))
def jobs_preflight(body: JobCreate, db: DatabaseDep, tenant: TenantDep, settings: SettingsDep) -> PreflightOut:
    planned = job_service.plan(db, settings, tenant, body)
    return PreflightOut(
        admitted=not planned.refusals, spec=planned.spec.model_dump(mode="json"),
        dataset=planned.dataset.name if planned.dataset else planned.spec.dataset, dataset_id=planned.dataset.id if planned.dataset else None,
        device=planned.device, estimate=EstimateOut(**planned.estimate.to_dict()),
        refusals=[Refusal(field=field, message=message) for field, message in planned.refusals],
    )


@router.get("", response_model=JobList, summary="List your jobs, newest first", responses=responses(422))
def jobs_list(
    session: SessionDep,
    tenant: TenantDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobList:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status_filter:
        query = query.where(Job.status == status_filter)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return JobList(items=[JobOut.model_validate(j) for j in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, summary="Status, progress, metrics and error of a job", responses=responses(404, 422))
def jobs_get(job: OwnedJob) -> Job:
    return job


@router.get("/{job_id}/metrics", response_model=list[EpochMetricOut], summary="Per-epoch metrics", responses=responses(404, 422))
def jobs_metrics(job: OwnedJob, session: SessionDep) -> list[EpochMetric]:
    return list(session.scalars(select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch)))


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job", responses=responses(404, 409, 422))
def jobs_cancel(job: OwnedJob, session: SessionDep) -> Job:
    return jobs.request_cancel(session, job)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a finished job and its files",
               responses=responses(404, 409, 422))
def jobs_delete(job: OwnedJob, db: DatabaseDep, storage: StorageDep) -> Response:
    db.run(lambda session: jobs.delete_finished(session, session.get_one(Job, job.id)))
    storage.delete_job(job.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{job_id}/events",
    summary="Server-sent events: the job's state whenever it changes, until it finishes",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "`event: job` with the job (as GET /v1/jobs/{id}) on every change, then `event: end`"},
               **responses(404, 422, 429)},
)
async def jobs_events(job: OwnedJob, tenant: TenantDep, watcher: JobWatcherDep, slots: StreamSlotsDep) -> StreamingResponse:
    slots.acquire(tenant.id)
    first = JobOut.model_validate(job).model_dump(mode="json")
    return StreamingResponse(_events(first, tenant, watcher, slots), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(first: dict[str, Any], tenant: TenantContext, watcher: JobWatcher, slots: TenantSlots) -> AsyncIterator[str]:
    try:
        async with watcher.watch(first["id"], tenant.key_prefix) as subscription:
            state: dict[str, Any] | None = first
            last_sent = None
            while True:
                if state is None:
                    yield "event: deleted\ndata: {}\n\n"
                    return
                if state.get("revoked"):
                    yield f"event: error\ndata: {json.dumps({'detail': 'the API key was revoked'})}\n\n"
                    return
                if state["updated_at"] != last_sent:
                    last_sent = state["updated_at"]
                    yield f"event: job\ndata: {json.dumps(state)}\n\n"
                    if JobStatus(state["status"]).terminal:
                        yield f"event: end\ndata: {json.dumps({'status': state['status']})}\n\n"
                        return
                try:
                    state = await asyncio.wait_for(subscription.news.get(), timeout=KEEP_ALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
    finally:
        slots.release(tenant.id)
