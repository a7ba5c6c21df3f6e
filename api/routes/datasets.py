"""Datasets: the built-ins, and uploads (streamed to disk, size-limited, validated, fingerprinted)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from core.db import datasets
from core.db.models import Dataset
from core.engine.builtin_datasets import BUILTIN_DATASETS

from ..deps import DatabaseDep, DatasetId, SettingsDep, StorageDep, TenantDep, UploadSlotsDep, find_owned
from ..errors import responses
from ..schemas import PRINTABLE, DatasetList, DatasetOut
from ..services import datasets as dataset_service
from ..uploads import IncomingFile

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=responses(401, 503))


def builtin_datasets() -> list[DatasetOut]:
    return [DatasetOut(id=name, name=name, builtin=True, description=text) for name, text in BUILTIN_DATASETS.items()]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a dataset file (the raw body, or a multipart form's file field)",
    description=(
        "Send the file as the body "
        "(`curl -H 'Authorization: Bearer …' --data-binary @cats.zip '…/v1/datasets?name=cats&filename=cats.zip'`) "
        "or as a form's file field (`curl -H 'Authorization: Bearer …' -F file=@cats.zip '…/v1/datasets?name=cats'`). "
        "Accepted: .npz with x_train, y_train, x_test, y_test; or a .zip / .tar / .tar.gz of image folders "
        "(train/<class>/…, test/<class>/…, or <class>/…). The file is streamed to disk, checked in full and fingerprinted; "
        "images of mixed sizes need `resize`."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}
                },
            },
        }
    },
    responses=responses(408, 409, 413, 422, 429),
)
async def datasets_upload(
    request: Request,
    db: DatabaseDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    slots: UploadSlotsDep,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=128,
            pattern=PRINTABLE,
            description="your name for the dataset, unique among yours (409 if taken): jobs may name it by it "
            "(default: the file's name without extension)",
        ),
    ] = None,
    filename: Annotated[
        str | None,
        Query(
            min_length=1, max_length=200, description="the file's name, for reference (default: the form field's file name, or 'upload')"
        ),
    ] = None,
    resize: Annotated[
        str | None,
        Query(
            pattern=r"^\d{1,4}[x×]\d{1,4}$",
            examples=["32x32"],
            description="WIDTHxHEIGHT: resize every image to this size (needed when sizes differ)",
        ),
    ] = None,
) -> Dataset:
    incoming = IncomingFile(request.stream(), request.headers.get("content-type", ""), filename)
    with slots.slot(tenant.id):
        return await dataset_service.upload(
            db,
            storage,
            settings,
            tenant,
            incoming,
            name=name,
            resize=resize,
            declared_size=request.headers.get("content-length"),
            validations=request.app.state.validations,
        )


@router.get("", response_model=DatasetList, summary="Built-in datasets and your uploads")
async def datasets_list(db: DatabaseDep, tenant: TenantDep) -> DatasetList:
    uploads = await db.arun(lambda session: datasets.of_tenant(session, tenant.id))
    return DatasetList(items=builtin_datasets() + [DatasetOut.model_validate(d) for d in uploads])


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset", responses=responses(404, 422))
async def datasets_get(dataset_id: DatasetId, db: DatabaseDep, tenant: TenantDep) -> DatasetOut:
    builtin = {d.id: d for d in builtin_datasets()}
    if dataset_id in builtin:
        return builtin[dataset_id]
    return DatasetOut.model_validate(await db.arun(lambda session: find_owned(session, Dataset, dataset_id, tenant)))


@router.delete(
    "/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an uploaded dataset", responses=responses(404, 405, 409, 422)
)
async def datasets_delete(dataset_id: DatasetId, db: DatabaseDep, tenant: TenantDep, storage: StorageDep) -> Response:
    if dataset_id in BUILTIN_DATASETS:
        raise HTTPException(status.HTTP_405_METHOD_NOT_ALLOWED, f"{dataset_id} is built in and cannot be deleted")

    def delete(session: Session) -> str:
        locked = datasets.lock(session, dataset_id)  # before reading it: a delete that won a race is seen (404)
        if locked is None or locked.tenant_id != tenant.id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} not found")
        return datasets.delete_unused(session, locked)

    key = await db.arun(delete)
    await run_in_threadpool(storage.delete, key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
