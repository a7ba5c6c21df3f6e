"""Tenants, their API keys and limits. A key is `pk_<prefix>_<secret>`; only its SHA-256 is stored
(keys are 32 random bytes, so a slow hash adds nothing), looked up by prefix, compared in constant time."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.settings import Settings

from .models import ApiKey, Tenant, UISession, utcnow

KEY_PREFIX = "pk"
LAST_USED_RESOLUTION_SECONDS = 60  # at most one write a minute per key, so polling stays read-only


@dataclass(frozen=True)
class TenantContext:
    """Who is calling, detached from any session: safe to keep for a whole request or stream."""

    id: str
    name: str
    max_concurrent_jobs: int | None
    max_upload_bytes: int | None
    max_storage_bytes: int | None
    max_job_hours: float | None
    key_prefix: str


TENANT_COLUMNS = (
    Tenant.id,
    Tenant.name,
    Tenant.max_concurrent_jobs,
    Tenant.max_upload_bytes,
    Tenant.max_storage_bytes,
    Tenant.max_job_hours,
    ApiKey.prefix,
)


class HasLimits(Protocol):
    """A tenant's own limits, None where the deployment's default applies (a Tenant row or a TenantContext)."""

    @property
    def max_concurrent_jobs(self) -> int | None: ...
    @property
    def max_upload_bytes(self) -> int | None: ...
    @property
    def max_storage_bytes(self) -> int | None: ...
    @property
    def max_job_hours(self) -> float | None: ...


@dataclass(frozen=True)
class Limits:
    """The limits that apply to a tenant: its own where the operator set them (set-limits), else the deployment's."""

    concurrent_jobs: int
    upload_bytes: int
    storage_bytes: int
    job_hours: float


def effective_limits(tenant: HasLimits, settings: Settings) -> Limits:
    return Limits(
        concurrent_jobs=tenant.max_concurrent_jobs or settings.tenant_max_concurrent_jobs,
        upload_bytes=tenant.max_upload_bytes or settings.max_upload_bytes,
        storage_bytes=tenant.max_storage_bytes or settings.tenant_max_storage_bytes,
        job_hours=tenant.max_job_hours or settings.max_job_hours,
    )


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise what one tenant does that counts or names its things (submissions against its job limit, uploads
    against its quota and names, a cancel or delete racing a delete): a no-op write takes the row lock (PostgreSQL)
    or the database's write lock (SQLite) before anything is counted, so count-then-insert is atomic."""
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))


def _context(row: Any) -> TenantContext:
    return TenantContext(
        row.id, row.name, row.max_concurrent_jobs, row.max_upload_bytes, row.max_storage_bytes, row.max_job_hours, row.prefix
    )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant: Tenant, name: str = "") -> tuple[ApiKey, str]:
    """Returns the stored row and the plaintext key, which is shown once and never stored."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key), name=name)
    session.add(row)
    session.flush()
    return row, key


def key_prefix(key: str) -> str | None:
    parts = key.split("_", 2)
    return parts[1] if len(parts) == 3 and parts[0] == KEY_PREFIX else None


def authenticate(session: Session, key: str) -> TenantContext | None:
    """The tenant of a valid, unrevoked key, else None."""
    prefix = key_prefix(key)
    if prefix is None:
        return None
    row = session.execute(
        select(ApiKey.key_hash, ApiKey.revoked_at, ApiKey.last_used_at, *TENANT_COLUMNS).join(Tenant).where(ApiKey.prefix == prefix)
    ).first()
    # compare even when no row matches, so timing does not reveal which prefixes exist
    expected = row.key_hash if row is not None else hash_key("")
    if not hmac.compare_digest(expected, hash_key(key)) or row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > LAST_USED_RESOLUTION_SECONDS:
        session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(last_used_at=now))
    return _context(row)


def revoke_key(session: Session, prefix: str) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        return False
    row.revoked_at = row.revoked_at or utcnow()
    return True


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).join(Tenant).order_by(ApiKey.created_at)))


def set_limits(session: Session, tenant: Tenant, **limits: int | None) -> None:
    """max_concurrent_jobs=, max_upload_bytes=, max_storage_bytes=: the tenant's own limits (None leaves one as it is)."""
    for name, value in limits.items():
        if value is not None:
            setattr(tenant, name, value)


# --- the web UI's sessions --------------------------------------------------------------------


def start_ui_session(session: Session, tenant: TenantContext, lifetime: dt.timedelta) -> str:
    """A new sign-in for the key `tenant` was authenticated with; returns the cookie's token (shown once)."""
    token = secrets.token_urlsafe(32)
    key_id = session.scalar(select(ApiKey.id).where(ApiKey.prefix == tenant.key_prefix))
    session.add(UISession(id=hash_key(token), api_key_id=key_id, expires_at=utcnow() + lifetime))
    return token


def ui_session_tenant(session: Session, token: str) -> TenantContext | None:
    """The tenant of a live UI session: not expired, its key not revoked."""
    row = session.execute(
        select(*TENANT_COLUMNS)
        .select_from(UISession)
        .join(ApiKey)
        .join(Tenant)
        .where(UISession.id == hash_key(token), UISession.expires_at > utcnow(), ApiKey.revoked_at.is_(None))
    ).first()
    return None if row is None else _context(row)


def end_ui_session(session: Session, token: str) -> None:
    session.execute(delete(UISession).where(UISession.id == hash_key(token)))
    session.execute(delete(UISession).where(UISession.expires_at <= utcnow()))  # tidy expired ones on the way
