"""Dependencies shared by every route: settings, a database session, storage, the current tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Cookie, Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.db.models import Tenant
from core.db.session import session_factory
from core.settings import Settings, get_settings
from core.storage import Storage

from .security import authenticate

bearer = HTTPBearer(auto_error=False, description="API key: Authorization: Bearer pk_...")


def settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings_dep)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    """A session per request; routes commit their writes explicitly before responding."""
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]


def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.data_dir)


StorageDep = Annotated[Storage, Depends(get_storage)]


def current_tenant(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Tenant:
    tenant = authenticate(session, credentials.credentials) if credentials else None
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]

# The web UI (/ui) signs in once and keeps the API key in an HttpOnly, SameSite=Strict cookie,
# because a browser sends no Authorization header for page loads, <img> or download links.
UI_COOKIE = "peeraid_key"


def ui_signed_in(session: SessionDep, key: Annotated[str | None, Cookie(alias=UI_COOKIE)] = None) -> Tenant | None:
    return authenticate(session, key) if key else None


def ui_tenant(tenant: Annotated[Tenant | None, Depends(ui_signed_in)]) -> Tenant:
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in at /ui")
    return tenant


UITenantDep = Annotated[Tenant, Depends(ui_tenant)]

__all__ = ["SessionDep", "SettingsDep", "StorageDep", "TenantDep", "UITenantDep", "get_settings"]
