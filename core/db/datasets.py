"""Uploaded datasets: the row of a validated upload (its name unique within its tenant), and deletion that
cannot race a submission."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .models import ACTIVE_STATUSES, Dataset, Job


class DatasetInUse(Exception):
    def __init__(self, dataset_id: str, active: int):
        self.dataset_id, self.active = dataset_id, active
        super().__init__(f"dataset {dataset_id} is used by {active} queued or running job(s)")


def storage_used(session: Session, tenant_id: str) -> int:
    """Bytes of the tenant's stored uploads."""
    return session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)) or 0


def lock(session: Session, dataset_id: str) -> Dataset | None:
    """The dataset, locked until the transaction ends (a submission naming it and its deletion serialise);
    the no-op write takes the row lock on PostgreSQL and the write lock on SQLite."""
    session.execute(update(Dataset).where(Dataset.id == dataset_id).values(name=Dataset.name))
    return session.get(Dataset, dataset_id)


def of_tenant(session: Session, tenant_id: str) -> list[Dataset]:
    return list(session.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id).order_by(Dataset.created_at.desc())))


def named(session: Session, tenant_id: str, name: str) -> Dataset | None:
    """The tenant's dataset of this name (names are unique per tenant)."""
    return session.scalar(select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.name == name))


def delete_unused(session: Session, dataset: Dataset) -> str:
    """Delete the dataset's row unless a queued or running job uses it; returns its storage key."""
    lock(session, dataset.id)
    active = session.scalar(select(func.count()).where(Job.dataset_id == dataset.id, Job.status.in_(ACTIVE_STATUSES))) or 0
    if active:
        raise DatasetInUse(dataset.id, active)
    session.delete(dataset)
    return dataset.storage_key
