"""Authenticating a request's API key in its own short transaction (never held while the request runs)."""

from __future__ import annotations

from core.db import tenants
from core.db.session import Database
from core.db.tenants import TenantContext


def authenticate(db: Database, key: str) -> TenantContext | None:
    if tenants.key_prefix(key) is None:
        return None
    return db.run(lambda session: tenants.authenticate(session, key))
