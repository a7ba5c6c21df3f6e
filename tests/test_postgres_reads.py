"""The API's hot reads straight through asyncpg (core/db/postgres_reads.py) give what SQLAlchemy gives
(timezone-aware timestamps, decoded JSON, labelled columns), bind their parameters, survive the server
dropping every connection, and refuse a statement built per call. Needs the local PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg
import pytest
from sqlalchemy import bindparam, select

from api.routes.jobs import JOB_BY_ID
from api.schemas import JOB_LISTING
from core.db.models import Base, Job, JobStatus
from core.db.postgres_reads import MAX_STATEMENTS, PostgresReads
from core.db.session import Database
from core.db.tenants import get_or_create_tenant
from tests.stack import PG_ADMIN_URL, POSTGRES_GROUP, _postgres_available, require_services, throwaway_database

pytestmark = pytest.mark.xdist_group(POSTGRES_GROUP)  # one PostgreSQL test restarts the server


@pytest.fixture(scope="module")
def database():
    require_services(_postgres_available())
    with throwaway_database() as (name, url):
        db = Database(url)
        try:
            Base.metadata.create_all(db.engine)
            yield db, name
        finally:
            db.engine.dispose()


def add_jobs(db: Database, tenant_name: str, statuses: list[JobStatus]) -> tuple[str, list[str]]:
    def work(session):
        tenant = get_or_create_tenant(session, tenant_name)
        session.flush()
        jobs = [
            Job(
                tenant_id=tenant.id,
                dataset_name="digits",
                spec={"epochs": 3, "peeraid": {"tau": 5.0}},
                status=status,
                progress={"epoch": 1, "of": 3},
                warnings=[{"kind": "chance", "message": "ü ✓"}],
                created_at=dt.datetime(2026, 11, 26, 1, 0, i, tzinfo=dt.UTC),
            )
            for i, status in enumerate(statuses)
        ]
        session.add_all(jobs)
        session.flush()
        return tenant.id, [job.id for job in jobs]

    return db.run(work)


async def sqlalchemy_rows(db: Database, statement, parameters) -> list[dict]:
    async with db.async_engine().connect() as connection:
        return [dict(row) for row in (await connection.execute(statement, parameters)).mappings()]


def test_a_job_reads_as_sqlalchemy_reads_it(database):
    db, _ = database
    tenant_id, (job_id,) = add_jobs(db, "reads-one", [JobStatus.RUNNING])
    parameters = {"job_id": job_id, "tenant_id": tenant_id}

    async def both():
        fast = await db.afetch(JOB_BY_ID, parameters)
        reference = await sqlalchemy_rows(db, JOB_BY_ID, parameters)
        other_tenant = await db.afetch(JOB_BY_ID, {"job_id": job_id, "tenant_id": "tn_nobody"})
        await db.aclose()
        return fast, reference, other_tenant

    fast, reference, other_tenant = asyncio.run(both())
    assert fast == reference and len(fast) == 1
    row = fast[0]
    assert row["created_at"] == dt.datetime(2026, 11, 26, 1, 0, 0, tzinfo=dt.UTC)  # aware, as UTCDateTime returns it
    assert row["spec"] == {"epochs": 3, "peeraid": {"tau": 5.0}} and row["warnings"][0]["message"] == "ü ✓"
    assert row["dataset_name"] == "digits"
    assert other_tenant == []


def test_a_page_of_jobs_by_status_with_its_count(database):
    db, _ = database
    statuses = [JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.QUEUED]
    tenant_id, ids = add_jobs(db, "reads-page", statuses)
    page, count = JOB_LISTING.statements[True]
    parameters = {"tenant_id": tenant_id, "status": "queued", "limit": 2, "offset": 1}

    async def read():
        rows = await db.afetch(page, parameters)
        total = await db.afetch(count, parameters)
        everything = await db.afetch(JOB_LISTING.statements[False][0], {**parameters, "limit": 10, "offset": 0})
        await db.aclose()
        return rows, total, everything

    rows, total, everything = asyncio.run(read())
    queued_newest_first = [ids[4], ids[2], ids[0]]
    assert [r["id"] for r in rows] == queued_newest_first[1:3]
    assert total == [{"n": 3}]
    assert [r["id"] for r in everything] == ids[::-1]


def test_reads_survive_the_server_dropping_every_connection(database):
    db, name = database
    tenant_id, (job_id,) = add_jobs(db, "reads-restart", [JobStatus.QUEUED])
    parameters = {"job_id": job_id, "tenant_id": tenant_id}

    async def read_drop_read():
        first = await asyncio.gather(*(db.afetch(JOB_BY_ID, parameters) for _ in range(8)))  # several pooled connections
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            dropped = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
            ).fetchone()
        after = [await db.afetch(JOB_BY_ID, parameters) for _ in range(12)]
        await db.aclose()
        return first, dropped, after

    first, dropped, after = asyncio.run(read_drop_read())
    assert dropped[0] >= 1
    assert all(rows[0]["id"] == job_id for rows in first + after)


def test_a_statement_built_per_call_is_refused():
    reads = PostgresReads("postgresql://nobody@127.0.0.1:1/none")
    for _ in range(MAX_STATEMENTS):
        reads.compile(select(Job.id).where(Job.id == bindparam("job_id")))
    with pytest.raises(RuntimeError, match="build each once"):
        reads.compile(select(Job.id).where(Job.id == bindparam("job_id")))
    assert PostgresReads("postgresql://nobody@127.0.0.1:1/none").compile(JOB_BY_ID).sql.count("$") == 2
