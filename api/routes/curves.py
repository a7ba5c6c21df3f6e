"""A job's training curves as a PNG, rendered from its per-epoch metrics."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from fastapi import APIRouter, Request, Response, status

from core.db import jobs
from core.db.models import Job
from core.db.session import Database

from .. import cpu_worker
from ..cpu_work import CpuWork
from ..deps import CpuWorkDep, DatabaseDep, OwnedJob
from ..errors import responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(401, 503))
RENDERED: OrderedDict[str, bytes] = OrderedDict()  # ETag → PNG, the most recently served last
MAX_RENDERED = 64  # about 30 KB each


async def curves_png(request: Request, db: Database, cpu_work: CpuWork, job: Job, title: str = "") -> Response:
    """The curves of a job the caller already owns (the /v1 and the /ui images); 304 while its epochs are unchanged.
    Rendered once per change (the last MAX_RENDERED images are kept by ETag): Matplotlib takes about 0.2 s of
    CPU, so a render is CPU-heavy work, within the tenant's limit (429 beyond), in a worker process."""
    records = [m.record for m in await db.arun(lambda session: jobs.epochs(session, job.id))]
    etag = '"' + hashlib.sha256(json.dumps([title, records], sort_keys=True, default=str).encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    png = RENDERED.get(etag)
    if png is None:
        png = RENDERED[etag] = await cpu_work.run(
            request, job.tenant_id, lambda offload: offload(cpu_worker.training_curves_png, records, title)
        )
        while len(RENDERED) > MAX_RENDERED:
            RENDERED.popitem(last=False)
    RENDERED.move_to_end(etag)
    return Response(png, media_type="image/png", headers=headers)


@router.get(
    "/{job_id}/curves.png",
    summary="Training curves: validation clean/PGD accuracy (student, SWA student), losses and learning rate per epoch",
    response_class=Response,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}, **responses(404, 422, 429)},
)
async def jobs_curves(job: OwnedJob, request: Request, db: DatabaseDep, cpu_work: CpuWorkDep) -> Response:
    return await curves_png(request, db, cpu_work, job, title=job.id)
