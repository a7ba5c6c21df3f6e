"""Datasets: the built-ins, and uploads (streamed to disk, size-limited, validated, fingerprinted)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from core.db.models import ACTIVE_STATUSES, Dataset, Job, new_id
from core.engine.errors import DatasetError
from core.engine.sources import BUILTIN_DATASETS
from core.engine.dataset_files import inspect_dataset_file
from core.storage import UploadTooLarge

from ..deps import SessionDep, SettingsDep, StorageDep, TenantDep
from ..schemas import DatasetList, DatasetOut

router = APIRouter(prefix="/datasets", tags=["datasets"])

FILE_NAME = re.compile(r"^[\w.\- ]{1,200}$")


def builtin_datasets() -> list[DatasetOut]:
    return [DatasetOut(id=name, name=name, builtin=True, description=text) for name, text in BUILTIN_DATASETS.items()]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a dataset file as the raw request body",
    description=(
        "Send the file itself as the body (Content-Type: application/octet-stream), e.g. "
        "`curl -H 'Authorization: Bearer …' --data-binary @cats.zip '…/v1/datasets?name=cats&filename=cats.zip'`. "
        "Accepted: .npz with x_train, y_train, x_test, y_test; or a .zip / .tar / .tar.gz of image folders "
        "(train/<class>/…, test/<class>/…, or <class>/…). The file is streamed to disk, checked in full and fingerprinted."
    ),
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    responses={413: {"description": "larger than the upload limit"}, 422: {"description": "not a valid dataset file"}},
)
async def upload_dataset(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    name: Annotated[str, Query(min_length=1, max_length=128, description="your name for the dataset")],
    filename: Annotated[str, Query(min_length=1, max_length=200, description="original file name, for reference")] = "upload",
) -> Dataset:
    if not FILE_NAME.match(filename):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"filename {filename!r}: use letters, digits, '.', '-', '_' and spaces")
    limit = tenant.max_upload_bytes or settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{filename}: {declared} bytes is over the upload limit of {limit} bytes")

    dataset_id = new_id("ds")
    key = storage.dataset_key(tenant.id, dataset_id, "upload")
    try:
        size, sha256 = await storage.receive(key, request.stream(), limit)
    except UploadTooLarge:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{filename}: over the upload limit of {limit} bytes") from None
    if size == 0:
        storage.delete(key)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{filename}: the request body is empty; send the file as the body")
    try:
        summary = await run_in_threadpool(inspect_dataset_file, storage.path(key))
    except DatasetError as err:
        storage.delete(key)
        message = str(err).replace(storage.path(key).name, filename)  # the engine names our stored copy; name theirs
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message) from None
    except BaseException:
        storage.delete(key)
        raise

    dataset = Dataset(
        id=dataset_id, tenant_id=tenant.id, name=name, file_name=filename, format=summary["format"], size_bytes=size,
        sha256=sha256, fingerprint=summary["fingerprint"], num_train=summary["num_train"], num_test=summary["num_test"],
        classes=summary["classes"], input_shape=list(summary["input_shape"]), storage_key=key,
    )
    session.add(dataset)
    session.commit()
    return dataset


@router.get("", response_model=DatasetList, summary="Built-in datasets and your uploads")
def list_datasets(session: SessionDep, tenant: TenantDep) -> DatasetList:
    uploads = session.scalars(select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at.desc())).all()
    return DatasetList(items=builtin_datasets() + [DatasetOut.model_validate(d) for d in uploads])


def get_dataset(session, tenant, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} not found")
    return dataset


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def read_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    builtin = {d.id: d for d in builtin_datasets()}
    if dataset_id in builtin:
        return builtin[dataset_id]
    return DatasetOut.model_validate(get_dataset(session, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an uploaded dataset")
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep) -> Response:
    if dataset_id in BUILTIN_DATASETS:
        raise HTTPException(status.HTTP_405_METHOD_NOT_ALLOWED, f"{dataset_id} is built in and cannot be deleted")
    dataset = get_dataset(session, tenant, dataset_id)
    active = session.scalar(select(func.count()).where(Job.dataset_id == dataset.id, Job.status.in_(ACTIVE_STATUSES)))
    if active:
        raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {dataset_id} is used by {active} queued or running job(s)")
    key = dataset.storage_key
    session.delete(dataset)
    session.commit()
    storage.delete(key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
