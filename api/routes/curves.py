"""A job's training curves as a PNG, rendered from its per-epoch metrics."""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import EpochMetric, Job

from ..deps import OwnedJob, SessionDep
from ..errors import responses
from ..plots import training_curves_png

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(401))


def curves_png(request: Request, session: Session, job: Job, title: str = "") -> Response:
    """The curves of a job the caller already owns (the /v1 and the /ui images); 304 while its epochs are unchanged."""
    records = list(session.scalars(select(EpochMetric.record).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch)))
    etag = '"' + hashlib.sha256(json.dumps([title, records], sort_keys=True, default=str).encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(training_curves_png(records, title), media_type="image/png", headers=headers)


# a sync route: FastAPI runs it in the threadpool, so rendering never blocks the event loop
@router.get(
    "/{job_id}/curves.png",
    summary="Training curves: validation clean/PGD accuracy (student, SWA student), losses and learning rate per epoch",
    response_class=Response,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}, **responses(404, 422)},
)
def jobs_curves(job: OwnedJob, request: Request, session: SessionDep) -> Response:
    return curves_png(request, session, job, title=job.id)
