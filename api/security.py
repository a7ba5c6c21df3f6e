"""Authenticating a request's API key: in its own short transaction, remembered for a few seconds.

Clients poll (a job's status, its events): looking the key up once per request would be most of the
API's database work. A valid key's tenant is therefore kept for `auth_cache_seconds` (5 s by default),
so a revoked key stops working within that time; event streams check revocation themselves, and the
web UI's sessions are checked on every page."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict

from core.db import tenants
from core.db.session import Database
from core.db.tenants import TenantContext


class KeyCache:
    """Recently authenticated keys (by their SHA-256, never the key itself) → tenant, for `ttl` seconds."""

    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, TenantContext]] = OrderedDict()
        self.pending: dict[str, asyncio.Future[TenantContext | None]] = {}  # lookups under way, shared by their callers

    def get(self, digest: str) -> TenantContext | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, tenant: TenantContext) -> None:
        if self.ttl <= 0:
            return
        self._entries[digest] = (time.monotonic() + self.ttl, tenant)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


async def authenticate(db: Database, key: str, cache: KeyCache | None = None) -> TenantContext | None:
    if tenants.key_prefix(key) is None:
        return None
    if cache is None:
        return await db.arun(lambda session: tenants.authenticate(session, key))
    digest = hashlib.sha256(key.encode()).hexdigest()
    if (tenant := cache.get(digest)) is not None:
        return tenant
    if (pending := cache.pending.get(digest)) is not None:  # a burst of requests with one key: one lookup
        return await asyncio.shield(pending)
    lookup = cache.pending[digest] = asyncio.get_running_loop().create_future()
    try:
        tenant = await db.arun(lambda session: tenants.authenticate(session, key))
    except BaseException as err:
        lookup.set_exception(err)
        lookup.exception()  # retrieved: no "never retrieved" warning when nobody else waited
        raise
    finally:
        cache.pending.pop(digest, None)
    lookup.set_result(tenant)
    if tenant is not None:
        cache.put(digest, tenant)
    return tenant
