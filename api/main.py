"""The FastAPI application: routes under /v1, a web UI at /ui, OpenAPI docs at /docs, health and metrics at the root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi_offline import FastAPIOffline

from core.db.session import database
from core.settings import Settings, get_settings
from core.storage import Storage
from core.sweep import sweep_orphans
from worker.queue import JobQueue

from .errors import register_error_handlers
from .metrics import MetricsMiddleware
from .request_limits import BodyLimits, InFlightLimit, register_validation_handler
from .routes import artifacts, catalog, curves, datasets, health, jobs, ui
from .security import KeyCache
from .streams import JobWatcher, TenantSlots

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the API serves: sweep files no row points at (interrupted uploads), at start-up and periodically."""
    sweeper = asyncio.create_task(_sweep_periodically(app.state.settings), name="sweeper")
    yield
    sweeper.cancel()
    await app.state.database.aclose()


async def _sweep_periodically(settings: Settings) -> None:
    db, storage = database(settings.resolved_database_url), Storage(settings.data_dir)
    while True:
        try:
            await run_in_threadpool(sweep_orphans, db, storage)
        except Exception:
            log.exception("sweeping orphaned files failed; next try in %.0f s", settings.sweep_interval)
        await asyncio.sleep(settings.sweep_interval)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPIOffline(  # Swagger UI and ReDoc from the package's own files: the docs work offline
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operation ids: jobs_create, datasets_upload, ...
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
    app.state.database = db = database(settings.resolved_database_url)  # the engine and its pool, before the first request
    app.state.job_watcher = JobWatcher(db)
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.state.stream_slots = TenantSlots("event streams", settings.tenant_max_streams)
    app.state.upload_slots = TenantSlots("uploads", settings.tenant_max_uploads)
    app.state.validations = asyncio.Semaphore(settings.max_parallel_validations)
    register_error_handlers(app)
    register_validation_handler(app)
    app.add_middleware(BodyLimits, max_bytes=settings.max_json_bytes, streamed_paths=("/v1/datasets",))
    app.add_middleware(InFlightLimit, limit=settings.key_max_in_flight)
    app.add_middleware(MetricsMiddleware)

    for module in (datasets, jobs, curves, artifacts, catalog, health, ui):  # /v1/..., /healthz etc., the web UI at /ui
        app.include_router(module.router)
    return app
