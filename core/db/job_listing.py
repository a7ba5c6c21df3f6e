"""A tenant's jobs, newest first, a page at a time, optionally of one status: the one listing query, which the
API's GET /v1/jobs and the web page's job list both run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Integer, Select, bindparam, func, select

from .models import Job, JobStatus
from .session import Database


class JobListing:
    """Its statements are built once, over the columns the caller shows (constructing and compiling a statement
    costs more than running it), and run without an ORM session."""

    def __init__(self, columns: Sequence[Any]):
        self.statements = {by_status: self._statements(columns, by_status) for by_status in (False, True)}

    @staticmethod
    def _statements(columns: Sequence[Any], by_status: bool) -> tuple[Select[Any], Select[Any]]:
        query = select(*columns).where(Job.tenant_id == bindparam("tenant_id"))
        if by_status:
            query = query.where(Job.status == bindparam("status"))
        page = (
            query.order_by(Job.created_at.desc(), Job.id)
            .limit(bindparam("limit", type_=Integer))
            .offset(bindparam("offset", type_=Integer))
        )
        return page, select(func.count().label("n")).select_from(query.subquery())

    async def page(
        self, db: Database, tenant_id: str, status: JobStatus | None, limit: int, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """(the tenant's jobs of that status in all, this page's rows)."""
        page, count = self.statements[status is not None]
        parameters = {"tenant_id": tenant_id, "status": status and status.value, "limit": limit, "offset": offset}
        rows = await db.afetch(page, parameters)
        if offset == 0 and len(rows) < limit:
            return len(rows), rows  # the whole list is on this page: no count needed
        return (await db.afetch(count, parameters))[0]["n"], rows
