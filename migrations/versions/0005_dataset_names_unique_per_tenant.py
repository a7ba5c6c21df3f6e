"""Dataset names unique per tenant

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A dataset's name is how users refer to it (`"dataset": "pets"`), so a tenant may hold only one dataset of
each name from now on: a unique index on (tenant_id, name).

Existing duplicates are renamed, never refused or dropped: within a tenant, the earliest dataset of a
name (by created_at, then id) keeps it, and each later one becomes "name (2)", "name (3)", … (the first
free number; the name shortened to fit the column's 128 characters). Every rename is logged as a warning
with the dataset's id, tenant and both names. Jobs refer to datasets by id, so none is affected; jobs
keep the `dataset_name` they were submitted with. The downgrade drops the index and keeps the new names.

An index rather than a table constraint: on SQLite a constraint would rebuild the table, and dropping the
old `datasets` there would set every job's dataset_id to NULL (ON DELETE SET NULL).
"""

import logging
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

log = logging.getLogger("alembic.runtime.migration")
NAME_LENGTH = 128
datasets = sa.table("datasets", sa.column("id"), sa.column("tenant_id"), sa.column("name"), sa.column("created_at"))


def _free_name(name: str, tenant_id: str, taken: set[tuple[str, str]]) -> str:
    number = 2
    while True:
        suffix = f" ({number})"
        candidate = name[: NAME_LENGTH - len(suffix)] + suffix
        if (tenant_id, candidate) not in taken:
            return candidate
        number += 1


def upgrade() -> None:
    """Upgrade schema."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(datasets.c.id, datasets.c.tenant_id, datasets.c.name).order_by(
            datasets.c.tenant_id, datasets.c.created_at, datasets.c.id
        )
    ).all()
    taken = {(row.tenant_id, row.name) for row in rows}
    kept: set[tuple[str, str]] = set()
    for row in rows:
        if (row.tenant_id, row.name) not in kept:
            kept.add((row.tenant_id, row.name))
            continue
        new_name = _free_name(row.name, row.tenant_id, taken)
        taken.add((row.tenant_id, new_name))
        kept.add((row.tenant_id, new_name))
        bind.execute(sa.update(datasets).where(datasets.c.id == row.id).values(name=new_name))
        log.warning(
            "dataset %s of tenant %s renamed from %r to %r: dataset names are unique per tenant from now on",
            row.id,
            row.tenant_id,
            row.name,
            new_name,
        )
    op.create_index("uq_datasets_tenant_name", "datasets", ["tenant_id", "name"], unique=True)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("uq_datasets_tenant_name", table_name="datasets")
