"""Robustification jobs: submit, list, inspect, follow, cancel, delete."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from core.db import jobs
from core.db.models import EpochMetric, Job, JobStatus
from core.db.tenants import TenantContext, lock_tenant

from .. import cpu_worker
from ..deps import (
    CpuWorkDep,
    DatabaseDep,
    JobId,
    JobQueueDep,
    JobWatcherDep,
    OwnedJob,
    SettingsDep,
    StorageDep,
    StreamSlotsDep,
    TenantDep,
    find_owned,
)
from ..errors import responses
from ..schemas import (
    JOB_LISTING,
    JOB_VIEW,
    EpochMetricOut,
    EstimateOut,
    JobCreate,
    JobList,
    JobOut,
    JobSummary,
    PreflightOut,
    Refusal,
    json_response,
)
from ..services import jobs as job_service
from ..streams import JobWatcher, TenantSlots

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(401, 503))
# built once: constructing and compiling a statement costs more than running it
JOB_BY_ID = select(*JOB_VIEW).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    summary="Submit a robustification job",
    responses={
        200: {"model": JobOut, "description": "A retry with the same Idempotency-Key: the job it made"},
        **responses(409, 413, 422, 429),
    },
)
async def jobs_create(
    request: Request,
    body: JobCreate,
    db: DatabaseDep,
    queue: JobQueueDep,
    tenant: TenantDep,
    settings: SettingsDep,
    cpu_work: CpuWorkDep,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=256, description="a fresh unique value (a UUID) per new job; retries with the same key return the same job"),
    ] = None,
) -> Response:
    if idempotency_key is not None and not idempotency_key.strip():  # `$(uuidgen)` with no uuidgen sends it empty
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "Idempotency-Key: must not be empty; send a fresh unique value (a UUID) with each new job, "
                    "or leave the header out",
                    "type": "value_error",
                }
            ],
        )
    # CPU-heavy (the pre-flight builds and counts the networks): one of the tenant's few CPU slots, the arithmetic in a
    # worker process, stopped if the client leaves before the job is made; the database work and the enqueue on a thread
    job, created = await cpu_work.run(
        request,
        tenant.id,
        lambda offload: job_service.submit(
            db, queue, settings, tenant, body, idempotency_key, functools.partial(offload, cpu_worker.preflight)
        ),
    )
    return json_response(JobOut.model_validate(job), status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@router.post(
    "/preflight",
    response_model=PreflightOut,
    summary="Check a job against its data and the limits, and estimate it, without submitting it",
    responses=responses(413, 422, 429),
)
async def jobs_preflight(
    request: Request, body: JobCreate, db: DatabaseDep, tenant: TenantDep, settings: SettingsDep, cpu_work: CpuWorkDep
) -> PreflightOut:
    planned = await cpu_work.run(
        request, tenant.id, lambda offload: job_service.plan(db, settings, tenant, body, functools.partial(offload, cpu_worker.preflight))
    )
    return PreflightOut(
        admitted=not planned.refusals,
        spec=planned.spec.model_dump(mode="json"),
        dataset=planned.dataset.name if planned.dataset else planned.spec.dataset,
        dataset_id=planned.dataset.id if planned.dataset else None,
        device=planned.device,
        estimate=EstimateOut(**planned.estimate.to_dict()),
        refusals=[Refusal(field=field, message=message) for field, message in planned.refusals],
    )


@router.get("", response_model=JobList, summary="List your jobs, newest first", responses=responses(422))
async def jobs_list(
    db: DatabaseDep,
    tenant: TenantDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Response:
    total, rows = await JOB_LISTING.page(db, tenant.id, status_filter, limit, offset)
    return json_response(JobList(items=[JobSummary.model_validate(r) for r in rows], total=total, limit=limit, offset=offset))


@router.get("/{job_id}", response_model=JobOut, summary="Status, progress, metrics and error of a job", responses=responses(404, 422))
async def jobs_get(job_id: JobId, tenant: TenantDep, db: DatabaseDep) -> Response:
    # the hottest route (clients poll it): one statement, no ORM session, the body serialised once
    rows = await db.afetch(JOB_BY_ID, {"job_id": job_id, "tenant_id": tenant.id})
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return json_response(JobOut.model_validate(rows[0]))


@router.get("/{job_id}/metrics", response_model=list[EpochMetricOut], summary="Per-epoch metrics", responses=responses(404, 422))
async def jobs_metrics(job: OwnedJob, db: DatabaseDep) -> list[EpochMetric]:
    return await db.arun(lambda session: jobs.epochs(session, job.id))


def _locked_job(session: Session, tenant: TenantContext, job_id: str) -> Job:
    """The tenant's job, read under the tenant's lock: a cancel or delete racing another request's delete
    finds the job gone (404) once that delete has committed, instead of acting on a row that vanished."""
    lock_tenant(session, tenant.id)
    return find_owned(session, Job, job_id, tenant)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job", responses=responses(404, 409, 422))
async def jobs_cancel(job_id: JobId, tenant: TenantDep, db: DatabaseDep) -> Job:
    return await db.arun(lambda session: jobs.request_cancel(session, _locked_job(session, tenant, job_id)))


@router.delete(
    "/{job_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a finished job and its files", responses=responses(404, 409, 422)
)
async def jobs_delete(job_id: JobId, tenant: TenantDep, db: DatabaseDep, storage: StorageDep) -> Response:
    await db.arun(lambda session: jobs.delete_finished(session, _locked_job(session, tenant, job_id)))
    await run_in_threadpool(storage.delete_job, job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{job_id}/events",
    summary="Server-sent events: the job's state whenever it changes, until it finishes",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`event: job` with the job (as GET /v1/jobs/{id}) on every change, then `event: end`",
        },
        **responses(404, 422, 429),
    },
)
async def jobs_events(
    job_id: JobId, tenant: TenantDep, db: DatabaseDep, watcher: JobWatcherDep, slots: StreamSlotsDep, settings: SettingsDep
) -> StreamingResponse:
    slots.acquire(tenant.id)  # before any database work: a tenant opening streams by the hundred costs one lookup each, at most
    try:
        rows = await db.afetch(JOB_BY_ID, {"job_id": job_id, "tenant_id": tenant.id})
        if not rows:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    except BaseException:
        slots.release(tenant.id)
        raise
    first = JobOut.model_validate(rows[0]).model_dump(mode="json")
    return StreamingResponse(
        _events(first, tenant, watcher, slots, settings.sse_keep_alive_seconds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _events(
    first: dict[str, Any], tenant: TenantContext, watcher: JobWatcher, slots: TenantSlots, keep_alive: float
) -> AsyncIterator[str]:
    """The job's state whenever it changes, and a keep-alive comment every `keep_alive` seconds on a clock of
    its own: the watcher hands over the job's state every round, changed or not, and that must not put it off."""
    loop = asyncio.get_running_loop()
    try:
        async with watcher.watch(first["id"], tenant.key_prefix) as subscription:
            state: dict[str, Any] | None = first
            last_sent = None
            next_keep_alive = loop.time() + keep_alive
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
                    state = await asyncio.wait_for(subscription.news.get(), timeout=max(0.0, next_keep_alive - loop.time()))
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    next_keep_alive = loop.time() + keep_alive
    finally:
        slots.release(tenant.id)
