"""Migrations applied to databases holding data, on SQLite and on PostgreSQL: the one that makes dataset
names unique per tenant renames the later of existing duplicates ("pets" → "pets (2)", …) rather than
refusing to run or dropping anything, and leaves the jobs that use them alone."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, insert, select
from sqlalchemy.exc import IntegrityError

from tests.stack import POSTGRES_GROUP, REPO, _postgres_available, require_services, throwaway_database

# The tables as the migration finds them, written with their columns, not through the models (which move on).
TENANTS = sa.table("tenants", sa.column("id"), sa.column("name"), sa.column("created_at"))
DATASETS = sa.table(
    "datasets",
    *(
        sa.column(name)
        for name in (
            "id",
            "tenant_id",
            "name",
            "file_name",
            "format",
            "size_bytes",
            "sha256",
            "fingerprint",
            "num_train",
            "num_test",
            "classes",
            "input_shape",
            "storage_key",
            "created_at",
        )
    ),
)
JOB_COLUMNS = ("id", "tenant_id", "dataset_id", "dataset_name", "spec", "status", "phase", "progress", "attempts", "max_attempts")
JOBS = sa.table("jobs", *(sa.column(name) for name in (*JOB_COLUMNS, "cancel_requested", "created_at", "updated_at")))
NOW = dt.datetime(2026, 11, 1)
LONG = "x" * 128  # the longest name a dataset may have


def config(url: str) -> Config:
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("script_location", str(REPO / "migrations"))
    config.attributes["database_url"] = url
    return config


def migrate_to(url: str, revision: str, down: bool = False) -> None:
    (command.downgrade if down else command.upgrade)(config(url), revision)


def revision_doing(prefix: str) -> tuple[str, str]:
    """(the revision whose description starts with `prefix`, the one before it): migrations found by what they do."""
    for script in ScriptDirectory.from_config(config("sqlite://")).walk_revisions():
        if (script.doc or "").startswith(prefix):
            assert isinstance(script.down_revision, str)
            return script.revision, script.down_revision
    raise AssertionError(f"no migration says {prefix!r}")


@contextmanager
def sqlite(tmp_path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'migrations.sqlite'}"


@contextmanager
def postgres(tmp_path) -> Iterator[str]:
    require_services(_postgres_available())
    with throwaway_database() as (_, url):
        yield url


def dataset(id_: str, tenant_id: str, name: str, minute: int) -> dict:
    return dict(
        id=id_,
        tenant_id=tenant_id,
        name=name,
        file_name="f.npz",
        format="npz",
        size_bytes=1,
        sha256="0" * 64,
        fingerprint="0" * 64,
        num_train=1,
        num_test=1,
        classes=json.dumps(["a", "b"]),
        input_shape=json.dumps([1, 8, 8]),
        storage_key=f"datasets/{tenant_id}/{id_}/data.upload",
        created_at=NOW.replace(minute=minute),
    )


@pytest.mark.parametrize("backend", [sqlite, pytest.param(postgres, marks=pytest.mark.xdist_group(POSTGRES_GROUP))])
def test_dataset_names_made_unique_by_renaming_the_later_duplicates(backend, tmp_path):
    unique_names, before = revision_doing("Dataset names unique per tenant")
    with backend(tmp_path) as url:
        migrate_to(url, before)
        engine = create_engine(url)
        try:
            with engine.begin() as db:
                db.execute(insert(TENANTS), [{"id": tenant, "name": tenant, "created_at": NOW} for tenant in ("tn_a", "tn_b")])
                db.execute(
                    insert(DATASETS),
                    [
                        dataset("ds_3", "tn_a", "pets", 3),
                        dataset("ds_1", "tn_a", "pets", 1),  # the earliest keeps the name
                        dataset("ds_2", "tn_a", "pets (2)", 2),  # taken already: the renames skip it
                        dataset("ds_4", "tn_a", "pets", 4),
                        dataset("ds_b", "tn_b", "pets", 5),  # another tenant's: untouched
                        dataset("ds_l1", "tn_a", LONG, 6),
                        dataset("ds_l2", "tn_a", LONG, 7),
                    ],
                )
                job = dict(zip(JOB_COLUMNS, ("job_1", "tn_a", "ds_3", "pets", "{}", "queued", "waiting", "{}", 0, 3), strict=True))
                db.execute(insert(JOBS), [{**job, "cancel_requested": False, "created_at": NOW, "updated_at": NOW}])
            migrate_to(url, unique_names)
            with engine.begin() as db:
                names = dict(db.execute(select(DATASETS.c.id, DATASETS.c.name)).all())
                assert db.scalar(select(JOBS.c.dataset_id).where(JOBS.c.id == "job_1")) == "ds_3", "a job keeps its dataset"
            assert names == {
                "ds_1": "pets",
                "ds_2": "pets (2)",
                "ds_3": "pets (3)",
                "ds_4": "pets (4)",
                "ds_b": "pets",
                "ds_l1": LONG,
                "ds_l2": LONG[:124] + " (2)",
            }
            with pytest.raises(IntegrityError), engine.begin() as db:
                db.execute(insert(DATASETS), [dataset("ds_5", "tn_a", "pets", 8)])
            migrate_to(url, "head")  # the later migrations on top
            migrate_to(url, before, down=True)  # and back: the index goes, the names stay
            with engine.begin() as db:
                db.execute(insert(DATASETS), [dataset("ds_5", "tn_a", "pets", 8)])
                assert db.scalar(select(DATASETS.c.name).where(DATASETS.c.id == "ds_3")) == "pets (3)"
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", [sqlite, pytest.param(postgres, marks=pytest.mark.xdist_group(POSTGRES_GROUP))])
def test_queued_jobs_an_earlier_version_left_are_made_claimable_or_cancelled(backend, tmp_path):
    """An earlier version re-queued jobs naming their last worker, and could leave a queued job with a cancel asked,
    which no claim took and the reconciler resent forever."""
    sends, before = revision_doing("Jobs count the messages sent")
    jobs = sa.table("jobs", *(sa.column(n) for n in ("id", "status", "worker", "heartbeat_at", "cancel_requested", "finished_at", "sends")))
    with backend(tmp_path) as url:
        migrate_to(url, before)
        engine = create_engine(url)
        try:
            with engine.begin() as db:
                db.execute(insert(TENANTS), [{"id": "tn_a", "name": "tn_a", "created_at": NOW}])
                rows = [
                    ("job_requeued", "queued", "host:1", False),
                    ("job_stuck", "queued", None, True),
                    ("job_running", "running", "host:2", True),
                ]
                for id_, status, _worker, cancel in rows:
                    job = dict(zip(JOB_COLUMNS, (id_, "tn_a", None, "digits", "{}", status, "x", "{}", 1, 3), strict=True))
                    db.execute(insert(JOBS), [{**job, "cancel_requested": cancel, "created_at": NOW, "updated_at": NOW}])
                for id_, _, worker, _ in rows:
                    db.execute(sa.text("UPDATE jobs SET worker = :w, heartbeat_at = :t WHERE id = :id"), {"w": worker, "t": NOW, "id": id_})
            migrate_to(url, sends)
            with engine.begin() as db:
                after = {r.id: r for r in db.execute(select(jobs))}
            assert (after["job_requeued"].status, after["job_requeued"].worker, after["job_requeued"].heartbeat_at) == (
                "queued",
                None,
                None,
            )
            assert after["job_stuck"].status == "cancelled" and after["job_stuck"].finished_at is not None
            assert (after["job_running"].status, after["job_running"].worker) == ("running", "host:2")  # its worker still owns it
            assert {r.sends for r in after.values()} == {0}
        finally:
            engine.dispose()
