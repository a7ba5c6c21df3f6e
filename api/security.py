"""Who is calling, and authenticating their API key or web session.

The caller is resolved once per request, at the edge (`api.request_limits.Edge`), before any route: from
the API key (`Authorization: Bearer <key>`, the scheme in any case, whitespace around and between ignored),
or on the web UI's pages (/ui) from the session cookie; failing both, the caller is its client address.
The route dependencies (`api.deps`) read that result from the request's scope (`CALLER`).

A key is checked in its own short transaction and remembered for a few seconds. Clients poll (a job's
status, its events): looking the key up once per request would be most of the API's database work. A
valid key's tenant is therefore kept for `auth_cache_seconds` (5 s by default), so a revoked key stops
working within that time; event streams check revocation themselves, and the web UI's sessions are
checked on every page. Which keys and sessions were valid recently, and whose key each was, is
remembered for longer (by digest, never the key itself): the edge looks an unknown credential up only
within its address's in-flight limit, so a flood of made-up keys from one address costs at most that
many lookups at once, while a credential seen before is looked up again freely — unless its key has
all its requests in flight already, when it is refused at once, without a lookup."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from core.db import tenants
from core.db.session import Database
from core.db.tenants import TenantContext

CALLER = "peeraid.caller"  # the request scope's key for the edge's Caller


@dataclass(frozen=True)
class Caller:
    """The edge's answer to 'who is this': a tenant (by its key or web session) or only a client address."""

    address: str
    tenant: TenantContext | None = None
    via: Literal["key", "session"] | None = None
    token: str | None = None  # the bearer token as sent, scheme and whitespace removed (the operator's token, too)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, however the scheme is cased and spaced."""
    parts = (header or "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


class KeyCache:
    """Recently authenticated keys (by their SHA-256, never the key itself) → tenant, for `ttl` seconds;
    and the digests of keys and sessions that were valid when last looked up → their key's prefix (`seen`),
    up to `max_seen` of them."""

    def __init__(self, ttl: float, max_entries: int = 10_000, max_seen: int = 100_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_seen = max_seen
        self._entries: OrderedDict[str, tuple[float, TenantContext]] = OrderedDict()
        self._seen: OrderedDict[str, str] = OrderedDict()
        self.pending: dict[str, asyncio.Future[TenantContext | None]] = {}  # lookups under way, shared by their callers

    def get(self, digest: str) -> TenantContext | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, tenant: TenantContext) -> None:
        self.remember(digest, tenant.key_prefix)
        if self.ttl <= 0:
            return
        self._entries[digest] = (time.monotonic() + self.ttl, tenant)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def seen(self, digest: str) -> str | None:
        """The prefix of the key this credential belonged to when it was last found valid; None if it was not."""
        return self._seen.get(digest)

    def remember(self, digest: str, key_prefix: str) -> None:
        self._seen[digest] = key_prefix
        self._seen.move_to_end(digest)
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)
        self._seen.pop(digest, None)


async def authenticate(db: Database, key: str, cache: KeyCache | None = None) -> TenantContext | None:
    if tenants.key_prefix(key) is None:
        return None
    if cache is None:
        return await db.arun(lambda session: tenants.authenticate(session, key))
    key_digest = digest(key)
    if (tenant := cache.get(key_digest)) is not None:
        return tenant
    if (pending := cache.pending.get(key_digest)) is not None:  # a burst of requests with one key: one lookup
        return await asyncio.shield(pending)
    lookup = cache.pending[key_digest] = asyncio.get_running_loop().create_future()
    try:
        tenant = await db.arun(lambda session: tenants.authenticate(session, key))
    except BaseException as err:
        lookup.set_exception(err)
        lookup.exception()  # retrieved: no "never retrieved" warning when nobody else waited
        raise
    finally:
        cache.pending.pop(key_digest, None)
    lookup.set_result(tenant)
    if tenant is not None:
        cache.put(key_digest, tenant)
    else:
        cache.forget(key_digest)
    return tenant


def session_digest(token: str) -> str:
    return "session:" + digest(token)


async def session_tenant(db: Database, token: str, cache: KeyCache) -> TenantContext | None:
    """The tenant of a live web session, looked up on every page (a signed-out session or a revoked key ends it at once)."""
    tenant = await db.arun(lambda session: tenants.ui_session_tenant(session, token))
    if tenant is not None:
        cache.remember(session_digest(token), tenant.key_prefix)
    else:
        cache.forget(session_digest(token))
    return tenant
