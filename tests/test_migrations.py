"""Migrations applied to databases holding data, on SQLite and on PostgreSQL: 0004 makes dataset names
unique per tenant, renaming the later of existing duplicates ("pets" → "pets (2)", …) rather than
refusing to run or dropping anything."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, insert, select
from sqlalchemy.exc import IntegrityError

from core.db.models import Dataset, Job, Tenant
from tests.stack import POSTGRES_GROUP, REPO, _postgres_available, require_services, throwaway_database


def migrate_to(url: str, revision: str, down: bool = False) -> None:
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("script_location", str(REPO / "migrations"))
    config.attributes["database_url"] = url
    (command.downgrade if down else command.upgrade)(config, revision)


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
        classes=["a", "b"],
        input_shape=[1, 8, 8],
        storage_key=f"datasets/{tenant_id}/{id_}/data.upload",
        created_at=dt.datetime(2026, 11, 1, 0, minute, tzinfo=dt.UTC),
    )


LONG = "x" * 128  # the longest name a dataset may have


@pytest.mark.parametrize("backend", [sqlite, pytest.param(postgres, marks=pytest.mark.xdist_group(POSTGRES_GROUP))])
def test_0004_renames_duplicate_dataset_names_then_makes_them_unique(backend, tmp_path):
    with backend(tmp_path) as url:
        migrate_to(url, "0003")
        engine = create_engine(url)
        try:
            with engine.begin() as db:
                db.execute(insert(Tenant.__table__), [{"id": "tn_a", "name": "a"}, {"id": "tn_b", "name": "b"}])
                db.execute(
                    insert(Dataset.__table__),
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
                db.execute(
                    insert(Job.__table__), [{"id": "job_1", "tenant_id": "tn_a", "dataset_id": "ds_3", "dataset_name": "pets", "spec": {}}]
                )
            migrate_to(url, "head")
            with engine.begin() as db:
                names = dict(db.execute(select(Dataset.id, Dataset.name)).all())
            with engine.begin() as db:
                assert db.scalar(select(Job.dataset_id).where(Job.id == "job_1")) == "ds_3", "a job keeps its dataset"
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
                db.execute(insert(Dataset.__table__), [dataset("ds_5", "tn_a", "pets", 8)])
            migrate_to(url, "0003", down=True)  # and back: the constraint goes, the names stay
            with engine.begin() as db:
                db.execute(insert(Dataset.__table__), [dataset("ds_5", "tn_a", "pets", 8)])
        finally:
            engine.dispose()
