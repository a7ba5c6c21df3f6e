"""The FastAPI application: routes under /v1, a web UI at /ui, OpenAPI docs at /docs, health and metrics at the root."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from core.db.session import database
from core.settings import Settings, get_settings
from worker.queue import JobQueue

from .errors import register_error_handlers
from .metrics import MetricsMiddleware, register_job_collector
from .request_limits import BodyLimits, register_validation_handler
from .routes import artifacts, catalog, curves, datasets, health, jobs, ui

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="PeerAiD robustification service",
        version="1.0.0",
        description=(
            "Upload a dataset, choose student and peer architectures, and get back an adversarially robust student "
            "trained with PeerAiD (Jung et al., CVPR 2024). Authenticate with `Authorization: Bearer <API key>`."
        ),
    )
    app.state.settings = settings
    app.state.job_queue = JobQueue.for_settings(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database(settings.resolved_database_url)  # the engine and its pool, before the first request
    register_error_handlers(app)
    register_validation_handler(app)
    register_job_collector(settings.resolved_database_url)
    app.add_middleware(BodyLimits, max_bytes=settings.max_json_bytes)
    app.add_middleware(MetricsMiddleware)

    for module in (datasets, jobs, curves, artifacts, catalog, health, ui):  # /v1/..., /healthz etc., the web UI at /ui
        app.include_router(module.router)
    return app
