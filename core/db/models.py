"""Tenants and their API keys, datasets, jobs, per-epoch metrics and artifacts.

Every schema change goes through an Alembic migration in migrations/."""

from __future__ import annotations

import datetime as dt
import enum
import secrets
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class UTCDateTime(TypeDecorator):
    """Stored as naive UTC (SQLite keeps no zone), always returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect):
        return None if value is None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("tn"))
    name: Mapped[str] = mapped_column(String(128), unique=True)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    max_upload_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_job_hours: Mapped[float | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", cascade="all, delete-orphan")


class ApiKey(Base):
    """Only a SHA-256 of the secret is stored; keys are 32 random bytes, so a slow hash adds nothing."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class UISession(Base):
    """A signed-in web UI: the browser's cookie holds a random token whose SHA-256 is this row's id,
    never the API key. It ends at sign-out, at expiry, or when its key is revoked."""

    __tablename__ = "ui_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]


class Dataset(Base):
    __tablename__ = "datasets"
    # a tenant refers to its datasets by name, so one name names one dataset (migration 0005)
    __table_args__ = (Index("uq_datasets_tenant_name", "tenant_id", "name", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    file_name: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    num_train: Mapped[int]
    num_test: Mapped[int]
    classes: Mapped[list[Any]]
    input_shape: Mapped[list[Any]]
    resize: Mapped[list[Any] | None]  # (height, width) every image was resized to at upload, or None
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class JobStatus(enum.StrEnum):
    """A job's status; its transitions are in core/db/jobs.py, the only writer of job rows."""

    QUEUED = "queued"
    RUNNING = "running"
    EVALUATING = "evaluating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.EVALUATING)
LEASED_STATUSES = (JobStatus.RUNNING, JobStatus.EVALUATING)  # a worker owns the job
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    dataset_name: Mapped[str] = mapped_column(String(128))
    preset: Mapped[str | None] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]]

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    phase: Mapped[str] = mapped_column(String(128), default="waiting for a worker")
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    latest_metrics: Mapped[dict[str, Any] | None]
    best_metrics: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]  # the test-set report: {model: {best_epoch, validation, test}}
    evaluation: Mapped[dict[str, Any] | None]  # what the report covers: status, images per attack, failures, AutoAttack set
    warnings: Mapped[list[Any] | None]  # outcomes to distrust: [{model, kind, message, advice}]
    execution: Mapped[dict[str, Any] | None]  # how the steps ran: precision, CUDA graph or eager (and why), channels_last
    estimate: Mapped[dict[str, Any] | None]  # the pre-flight estimate at submission: memory, work, hours per device class
    error: Mapped[str | None] = mapped_column(Text)

    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(256))  # the owner while running or evaluating; none while queued; the last once ended
    sends: Mapped[int] = mapped_column(default=0, server_default="0")  # messages sent since the job last changed state
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[dt.datetime | None]  # the last message sent (the database's clock)
    started_at: Mapped[dt.datetime | None]
    heartbeat_at: Mapped[dt.datetime | None]  # the owner's last heartbeat (the database's clock)
    finished_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    epochs: Mapped[list[EpochMetric]] = relationship(cascade="all, delete-orphan", order_by="EpochMetric.epoch")
    artifacts: Mapped[list[Artifact]] = relationship(cascade="all, delete-orphan", order_by="Artifact.name")


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch", name="uq_epoch_metrics_job_epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    attempt: Mapped[int]
    record: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    file_name: Mapped[str] = mapped_column(String(128))
    media_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
