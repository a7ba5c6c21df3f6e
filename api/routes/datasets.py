"""Datasets: the built-ins, and uploads (streamed to disk, size-limited, validated, fingerprinted)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy import select

from core.db import datasets
from core.db.models import Dataset
from core.engine.sources import BUILTIN_DATASETS

from ..deps import DatabaseDep, DatasetId, SessionDep, SettingsDep, StorageDep, TenantDep, UploadSlotsDep, find_owned
from ..schemas import PRINTABLE, DatasetList, DatasetOut
from ..services import datasets as dataset_service

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


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
    db: DatabaseDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    slots: UploadSlotsDep,
    name: Annotated[str, Query(min_length=1, max_length=128, pattern=PRINTABLE, description="your name for the dataset")],
    filename: Annotated[str, Query(min_length=1, max_length=200, description="original file name, for reference")] = "upload",
) -> Dataset:
    with slots.slot(tenant.id):
        return await dataset_service.upload(
            db, storage, settings, tenant, name=name, filename=filename, declared_size=request.headers.get("content-length"),
            body=request.stream(), validations=request.app.state.validations,
        )


@router.get("", response_model=DatasetList, summary="Built-in datasets and your uploads")
def list_datasets(session: SessionDep, tenant: TenantDep) -> DatasetList:
    uploads = session.scalars(select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at.desc())).all()
    return DatasetList(items=builtin_datasets() + [DatasetOut.model_validate(d) for d in uploads])


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def read_dataset(dataset_id: DatasetId, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    builtin = {d.id: d for d in builtin_datasets()}
    if dataset_id in builtin:
        return builtin[dataset_id]
    return DatasetOut.model_validate(find_owned(session, Dataset, dataset_id, tenant))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an uploaded dataset")
def delete_dataset(dataset_id: DatasetId, db: DatabaseDep, tenant: TenantDep, storage: StorageDep) -> Response:
    if dataset_id in BUILTIN_DATASETS:
        raise HTTPException(status.HTTP_405_METHOD_NOT_ALLOWED, f"{dataset_id} is built in and cannot be deleted")
    key = db.run(lambda session: datasets.delete_unused(session, find_owned(session, Dataset, dataset_id, tenant)))
    storage.delete(key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
