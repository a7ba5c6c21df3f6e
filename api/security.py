"""API keys: `pk_<prefix>_<secret>`. Stored as SHA-256 only, looked up by prefix, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "pk"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, tenant: Tenant, name: str = "") -> tuple[ApiKey, str]:
    """Returns the stored row and the plaintext key, which is shown once and never stored."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key), name=name)
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, key: str) -> Tenant | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    found = session.execute(select(ApiKey, Tenant).join(Tenant).where(ApiKey.prefix == parts[1])).first()
    row, tenant = found if found is not None else (None, None)
    # compare even when no row matches, so timing does not reveal which prefixes exist
    expected = row.key_hash if row is not None else hash_key("")
    if not hmac.compare_digest(expected, hash_key(key)) or row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now  # at most one write a minute per key, so polling stays read-only
        session.commit()
    return tenant


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant
