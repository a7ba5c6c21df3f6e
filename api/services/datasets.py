"""Uploading a dataset: the body is streamed to disk under its size limit, validated in full off the
event loop, and only then recorded in one short transaction; anything refused leaves no file behind."""

from __future__ import annotations

import asyncio
import re

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import datasets
from core.db.models import Dataset, new_id
from core.db.session import Database
from core.db.tenants import TenantContext, effective_limits, lock_tenant
from core.engine.builtin_datasets import BUILTIN_DATASETS
from core.engine.dataset_files import inspect_dataset_file, parse_resize
from core.engine.errors import DatasetError
from core.settings import Settings
from core.storage import Storage, UploadStalled, UploadTooLarge

from ..uploads import IncomingFile
from .errors import InvalidUpload, NameTaken, OverLimit, UploadTimedOut

FILE_NAME = re.compile(r"^[\w.\- ]{1,200}$")
NAME_LENGTH = 128  # Dataset.name's column


def _stem(filename: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar", ".npz"):
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)] or filename
    return filename


def name_taken(session: Session, tenant: TenantContext, name: str) -> NameTaken | None:
    """The refusal naming the dataset that already has this name (a tenant's names are unique: a name is a reference)."""
    if name in BUILTIN_DATASETS:
        return NameTaken(f"'{name}' is the name of a built-in dataset ({name}): upload under another name")
    existing = datasets.named(session, tenant.id, name)
    if existing is None:
        return None
    return NameTaken(f"you already have a dataset named '{name}' ({existing.id}): upload under another name, or delete that one first")


def _quota_reached(filename: str, size: int | str, quota: int, used: int) -> OverLimit:
    return OverLimit(
        f"{filename}: {size} bytes would exceed your storage quota of {quota} bytes ({used} bytes used); delete datasets you no longer need"
    )


async def upload(
    db: Database,
    storage: Storage,
    settings: Settings,
    tenant: TenantContext,
    incoming: IncomingFile,
    *,
    name: str | None,
    resize: str | None,
    declared_size: str | None,
    validations: asyncio.Semaphore,
) -> Dataset:
    if incoming.filename is not None and not FILE_NAME.match(incoming.filename):
        raise InvalidUpload(f"filename {incoming.filename!r}: use letters, digits, '.', '-', '_' and spaces")
    filename = incoming.filename or "upload"
    try:
        size_to = parse_resize(resize) if resize else None
    except DatasetError as err:
        raise InvalidUpload(str(err)) from None
    if name is None and incoming.filename is not None:  # known before the body: refuse a taken name before it is sent
        name = _stem(incoming.filename)[:NAME_LENGTH]
    limits = effective_limits(tenant, settings)
    limit, quota = limits.upload_bytes, limits.storage_bytes

    def before_receiving(session: Session) -> int:
        if name is not None and (taken := name_taken(session, tenant, name)) is not None:
            raise taken
        return datasets.storage_used(session, tenant.id)

    used = await db.arun(before_receiving)
    if declared_size is not None and declared_size.isdigit() and not incoming.multipart:  # a form's length is more than its file
        if int(declared_size) > limit:
            raise OverLimit(f"{filename}: {declared_size} bytes is over the upload limit of {limit} bytes")
        if int(declared_size) > quota - used:
            raise _quota_reached(filename, declared_size, quota, used)

    dataset_id = new_id("ds")
    key = storage.dataset_key(tenant.id, dataset_id, "upload")
    async with storage.upload_in_progress(dataset_id):  # no sweep removes its files until it is recorded or refused
        try:
            size, sha256 = await storage.receive(key, incoming.chunks(), min(limit, max(0, quota - used)), settings.upload_idle_timeout)
        except UploadTooLarge:
            filename = incoming.filename or filename  # a form's file name arrives with its first bytes
            if limit <= quota - used:
                raise OverLimit(f"{filename}: over the upload limit of {limit} bytes") from None
            raise _quota_reached(filename, f"over {quota - used}", quota, used) from None
        except UploadStalled as err:
            filename = incoming.filename or filename
            raise UploadTimedOut(f"{filename}: the upload stalled ({err}); send it again") from None
        filename = incoming.filename or filename
        try:
            if size == 0:
                raise InvalidUpload(f"{filename}: the request body is empty; send the file as the body")
            try:
                async with validations:  # decoding is memory- and CPU-heavy: a few at a time, the others wait
                    summary = await run_in_threadpool(lambda: inspect_dataset_file(storage.path(key), resize=size_to))
            except DatasetError as err:
                message = str(err).replace(storage.path(key).name, filename)  # the engine names our stored copy; name theirs
                raise InvalidUpload(message) from None
            dataset = Dataset(
                id=dataset_id,
                tenant_id=tenant.id,
                name=name or _stem(filename)[:NAME_LENGTH],
                file_name=filename,
                format=summary["format"],
                size_bytes=size,
                sha256=sha256,
                fingerprint=summary["fingerprint"],
                num_train=summary["num_train"],
                num_test=summary["num_test"],
                classes=summary["classes"],
                input_shape=list(summary["input_shape"]),
                resize=list(size_to) if size_to else None,
                storage_key=key,
            )

            def record(session: Session) -> None:
                lock_tenant(session, tenant.id)  # concurrent uploads of one tenant: one name each, all under the quota
                if (taken := name_taken(session, tenant, dataset.name)) is not None:
                    raise taken
                now_used = datasets.storage_used(session, tenant.id)
                if now_used + size > quota:
                    raise _quota_reached(filename, size, quota, now_used)
                session.add(dataset)

            try:
                await db.arun(record)
            except IntegrityError:  # the unique index, should anything have slipped past the lock
                taken = await db.arun(lambda session: name_taken(session, tenant, dataset.name))
                raise taken or NameTaken(f"you already have a dataset named '{dataset.name}'") from None
        except BaseException:
            storage.delete(key)
            raise
    return dataset
