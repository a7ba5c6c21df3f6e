"""Server-sent job events without holding the database: one watcher per API process reads, once a
second and in one short transaction, the state of every job some stream follows and whether each
stream's API key is still valid, then hands every stream the news. A thousand streams on one job
cost one row read a second, and no stream keeps a connection while it waits.

Per-tenant slots bound how many streams and uploads one tenant may hold open at once in a process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import ApiKey, Job
from core.db.session import Database

from .schemas import JobOut

log = logging.getLogger(__name__)


class TenantSlots:
    """At most `limit` concurrent streams (or uploads, or CPU-heavy requests) per tenant in this process;
    429 beyond it, with `retry_after` and what to do (`hint`)."""

    def __init__(self, what: str, limit: int, retry_after: int = 10, hint: str = "close one and retry"):
        self.what = what
        self.limit = limit
        self.retry_after = retry_after
        self.hint = hint
        self.held: Counter[str] = Counter()

    def acquire(self, tenant_id: str) -> None:
        if self.held[tenant_id] >= self.limit:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"too many {self.what} at once (limit {self.limit} per tenant); {self.hint}",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.held[tenant_id] += 1

    def release(self, tenant_id: str) -> None:
        self.held[tenant_id] -= 1
        if self.held[tenant_id] <= 0:
            del self.held[tenant_id]

    @contextlib.contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        self.acquire(tenant_id)
        try:
            yield
        finally:
            self.release(tenant_id)


@dataclass(eq=False)
class Subscription:
    job_id: str
    key_prefix: str
    news: asyncio.Queue[dict[str, Any] | None] = field(default_factory=lambda: asyncio.Queue(maxsize=1))

    def tell(self, state: dict[str, Any] | None) -> None:
        """Only the latest state matters: a stream that has not read the last one gets this one instead."""
        if self.news.full():
            self.news.get_nowait()
        self.news.put_nowait(state)


@dataclass(frozen=True)
class Snapshot:
    jobs: dict[str, dict[str, Any]]
    revoked_prefixes: set[str]


class JobWatcher:
    def __init__(self, db: Database, interval: float = 1.0):
        self.db = db
        self.interval = interval
        self.subscriptions: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, key_prefix: str) -> AsyncIterator[Subscription]:
        subscription = Subscription(job_id, key_prefix)
        self.subscriptions.add(subscription)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="job-watcher")
        try:
            yield subscription
        finally:
            self.subscriptions.discard(subscription)

    async def _poll(self) -> None:
        while self.subscriptions:
            await asyncio.sleep(self.interval)
            watched = list(self.subscriptions)
            if not watched:
                break
            try:
                snapshot = await self.db.arun(functools.partial(_read, subscriptions=watched))
            except Exception:  # the database is away: streams keep waiting, the next round tries again
                log.warning("job watcher could not read the database", exc_info=True)
                continue
            for subscription in watched:
                if subscription.key_prefix in snapshot.revoked_prefixes:
                    subscription.tell({"revoked": True})
                else:
                    subscription.tell(snapshot.jobs.get(subscription.job_id))


def _read(session: Session, subscriptions: list[Subscription]) -> Snapshot:
    job_ids = {s.job_id for s in subscriptions}
    prefixes = {s.key_prefix for s in subscriptions}
    jobs = {job.id: JobOut.model_validate(job).model_dump(mode="json") for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
    active = set(session.scalars(select(ApiKey.prefix).where(ApiKey.prefix.in_(prefixes), ApiKey.revoked_at.is_(None))))
    return Snapshot(jobs, prefixes - active)
