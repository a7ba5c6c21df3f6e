"""The FastAPI application: routes under /v1, a web UI at /ui, OpenAPI docs at /docs, health and metrics at the root."""

from __future__ import annotations

import asyncio
import contextlib
import gc
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

from .cpu_work import CpuWork
from .deps import UI_COOKIE, UI_FORM_MAX_BYTES
from .errors import register_error_handlers
from .metrics import MetricsMiddleware
from .request_limits import Edge, register_validation_handler
from .routes import artifacts, catalog, curves, datasets, health, jobs, ui
from .security import KeyCache
from .streams import JobWatcher, TenantSlots

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the API serves: sweep files no row points at (interrupted uploads), at start-up and periodically.
    Before it serves, what is loaded by then (torch and the rest: some 350,000 objects) is moved out of the garbage
    collector's reach: a full collection, which stops the event loop, then takes milliseconds, not 200-500 ms."""
    gc.collect()
    gc.freeze()
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
    app.state.stream_slots = TenantSlots("event streams open", settings.tenant_max_streams)
    app.state.upload_slots = TenantSlots("uploads open", settings.tenant_max_uploads)
    app.state.cpu_work = CpuWork(settings.tenant_max_cpu_work, settings.cpu_workers)
    app.state.validations = asyncio.Semaphore(settings.max_parallel_validations)
    register_error_handlers(app)
    register_validation_handler(app)
    app.add_middleware(
        Edge,  # bodies capped, the caller resolved, requests in flight counted: before any route runs
        database=db,
        key_cache=app.state.key_cache,
        max_body_bytes=settings.max_json_bytes,
        key_limit=settings.key_max_in_flight,
        address_limit=settings.address_max_in_flight,
        session_limit=settings.session_max_in_flight,
        streamed=(("POST", "/v1/datasets"),),  # the upload streams, past the cap, once its route has checked the key
        forms=("/ui/login", "/ui/logout"),
        form_max_bytes=UI_FORM_MAX_BYTES,
        session_cookie=UI_COOKIE,
        refusal_delay=settings.refusal_delay_seconds,
    )
    app.add_middleware(MetricsMiddleware)

    for module in (datasets, jobs, curves, artifacts, catalog, health, ui):  # /v1/..., /healthz etc., the web UI at /ui
        app.include_router(module.router)
    return app
