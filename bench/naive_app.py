"""The baseline for GET /v1/jobs/{id}: the same work done the most direct way. One query finds the
API key by its SHA-256 and its tenant, one reads the job row, and the row goes back as JSON with the
fields the service answers. Served like the service's API: one uvicorn process with the same
settings, logging every request at INFO as the service does.

    PEERAID_DATABASE_URL=postgresql+psycopg://... PEERAID_API_PORT=8001 python -m bench.naive_app"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import sys

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy import create_engine, select

from core.db.models import ApiKey, Job, Tenant

JOB_COLUMNS = (
    Job.id,
    Job.status,
    Job.phase,
    Job.dataset_name.label("dataset"),
    Job.dataset_id,
    Job.preset,
    Job.spec,
    Job.progress,
    Job.latest_metrics,
    Job.best_metrics,
    Job.result,
    Job.error,
    Job.attempts,
    Job.cancel_requested,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.updated_at,
)


def as_json(value):
    return value.isoformat() if isinstance(value, dt.datetime) else value


def create_app(database_url: str) -> FastAPI:
    engine = create_engine(database_url, pool_size=10, max_overflow=20)  # the service's pool size
    app = FastAPI(title="naive GET /v1/jobs/{id}")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/jobs/{job_id}")
    def read_job(job_id: str, authorization: str = Header("")) -> JSONResponse:
        key_hash = hashlib.sha256(authorization.removeprefix("Bearer ").encode()).hexdigest()
        with engine.connect() as db:
            tenant_id = db.scalar(
                select(Tenant.id)
                .join(ApiKey, ApiKey.tenant_id == Tenant.id)
                .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
            )
            if tenant_id is None:
                raise HTTPException(401, "missing or invalid API key")
            job = db.execute(select(*JOB_COLUMNS).where(Job.id == job_id, Job.tenant_id == tenant_id)).mappings().first()
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return JSONResponse({name: as_json(value) for name, value in job.items()})

    return app


def main() -> None:
    import uvicorn

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(os.environ["PEERAID_DATABASE_URL"])
    host, port = os.environ.get("PEERAID_API_HOST", "127.0.0.1"), int(os.environ.get("PEERAID_API_PORT", "8001"))
    uvicorn.run(app, host=host, port=port, log_config=None, proxy_headers=True)  # as service.cli.run_api


if __name__ == "__main__":
    main()
