"""A job's training curves as a PNG, rendered from its per-epoch metrics."""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from core.db import jobs
from core.db.models import Job
from core.db.session import Database

from ..deps import DatabaseDep, OwnedJob
from ..errors import responses
from ..plots import training_curves_png

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(401, 503))


async def curves_png(request: Request, db: Database, job: Job, title: str = "") -> Response:
    """The curves of a job the caller already owns (the /v1 and the /ui images); 304 while its epochs are unchanged.
    Rendering runs in a thread: it is CPU work."""
    records = [m.record for m in await db.arun(lambda session: jobs.epochs(session, job.id))]
    etag = '"' + hashlib.sha256(json.dumps([title, records], sort_keys=True, default=str).encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(await run_in_threadpool(training_curves_png, records, title), media_type="image/png", headers=headers)


@router.get(
    "/{job_id}/curves.png",
    summary="Training curves: validation clean/PGD accuracy (student, SWA student), losses and learning rate per epoch",
    response_class=Response,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}, **responses(404, 422)},
)
async def jobs_curves(job: OwnedJob, request: Request, db: DatabaseDep) -> Response:
    return await curves_png(request, db, job, title=job.id)
