"""What routes are given, declared once: settings, the database, storage, the job queue and watcher,
the calling tenant (bearer key or the web UI's session cookie, as the edge resolved it: `api.security.Caller`),
and the job a path names — 404 unless the caller owns it.

Every dependency is `async`: none takes a thread, and the ones that read the database do it in one
short transaction on the event loop (`Database.arun`), holding a connection only while their queries
run. (A request that held a pooled connection while it waited for a worker thread could deadlock the
API under load: every thread waiting for a connection, every connection waiting for a thread.)"""

import hmac
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.db.models import Dataset, Job
from core.db.session import Database
from core.db.tenants import TenantContext
from core.settings import Settings
from core.storage import Storage
from worker.queue import JobQueue

from .cpu_work import CpuWork
from .schemas import ID_PATTERN
from .security import CALLER, Caller
from .streams import JobWatcher, TenantSlots

Owned = TypeVar("Owned", Job, Dataset)
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="a job's id (job_…)")]
DatasetId = Annotated[str, Path(pattern=ID_PATTERN, description="a dataset's id (ds_…) or a built-in dataset's name")]
ArtifactName = Annotated[str, Path(pattern=ID_PATTERN, description="an artifact's name, as the artifact listing gives it")]
bearer = HTTPBearer(auto_error=False, description="API key: Authorization: Bearer pk_...")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_database(request: Request) -> Database:
    # from the app's state, not from SettingsDep: every level of dependencies costs FastAPI time on every request
    return request.app.state.database


DatabaseDep = Annotated[Database, Depends(get_database)]


async def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.data_dir)


StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_job_queue(request: Request) -> JobQueue:
    return request.app.state.job_queue


JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]


async def get_job_watcher(request: Request) -> JobWatcher:
    return request.app.state.job_watcher


JobWatcherDep = Annotated[JobWatcher, Depends(get_job_watcher)]


async def get_stream_slots(request: Request) -> TenantSlots:
    return request.app.state.stream_slots


StreamSlotsDep = Annotated[TenantSlots, Depends(get_stream_slots)]


async def get_upload_slots(request: Request) -> TenantSlots:
    return request.app.state.upload_slots


UploadSlotsDep = Annotated[TenantSlots, Depends(get_upload_slots)]


async def get_cpu_work(request: Request) -> CpuWork:
    return request.app.state.cpu_work


CpuWorkDep = Annotated[CpuWork, Depends(get_cpu_work)]


def caller_of(request: Request) -> Caller:
    """Who the edge (api.request_limits.Edge) found this request to come from: resolved once, before any route."""
    return request.scope[CALLER]


async def current_tenant(request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> TenantContext:
    # `bearer` declares the scheme in OpenAPI; the key itself was checked at the edge
    caller = caller_of(request)
    if caller.tenant is None or caller.via != "key":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return caller.tenant


TenantDep = Annotated[TenantContext, Depends(current_tenant)]


async def is_operator(
    request: Request, settings: SettingsDep, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> bool:
    """The caller holds the operator's token (PEERAID_OPERATOR_TOKEN): cross-tenant counts and internal details."""
    token, presented = settings.operator_token, caller_of(request).token
    return bool(token) and presented is not None and hmac.compare_digest(presented.encode(), (token or "").encode())


OperatorDep = Annotated[bool, Depends(is_operator)]

# The web UI (/ui) signs in once with an API key and keeps a session token (never the key) in an HttpOnly,
# SameSite=Strict cookie, because a browser sends no Authorization header for page loads, <img> or downloads.
UI_COOKIE = "peeraid_session"
UI_FORM_MAX_BYTES = 4096  # the sign-in and sign-out forms' bodies (an API key at most), urlencoded


async def ui_signed_in(request: Request) -> TenantContext | None:
    """The web session's tenant, checked at the edge on every page (a signed-out session or a revoked key ends it)."""
    caller = caller_of(request)
    return caller.tenant if caller.via == "session" else None


async def ui_tenant(tenant: Annotated[TenantContext | None, Depends(ui_signed_in)]) -> TenantContext:
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in at /ui")
    return tenant


UITenantDep = Annotated[TenantContext, Depends(ui_tenant)]


def find_owned(session: Session, model: type[Owned], item_id: str, tenant: TenantContext) -> Owned:
    """The tenant's job or dataset with this id; another tenant's does not exist for you (404)."""
    item = session.get(model, item_id)
    if item is None or item.tenant_id != tenant.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{model.__tablename__.removesuffix('s')} {item_id} not found")
    return item


def _owned_job(tenant_dependency: Callable[..., Coroutine[Any, Any, TenantContext]]) -> Callable[..., Coroutine[Any, Any, Job]]:
    async def owned_job(job_id: JobId, db: DatabaseDep, tenant: Annotated[TenantContext, Depends(tenant_dependency)]) -> Job:
        """The job as it is now, detached from its session: its columns are loaded, its relationships are not."""
        return await db.arun(lambda session: find_owned(session, Job, job_id, tenant))

    return owned_job


OwnedJob = Annotated[Job, Depends(_owned_job(current_tenant))]
UIOwnedJob = Annotated[Job, Depends(_owned_job(ui_tenant))]
