"""Request and response bodies of the REST API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from pydantic_core import PydanticUndefined

from core.db.job_listing import JobListing
from core.db.models import Job, JobStatus
from core.engine.callbacks import JobProgress
from core.engine.spec import JobSpec

# Names and references users send: printable text only (no NUL or other control characters).
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # job and dataset ids, built-in dataset names, artifact names
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=PRINTABLE)]
Reference = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=PRINTABLE)]


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    """The body serialised once (a route returning a model would have it validated again for its response_model)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DatasetOut(Out):
    id: str
    name: str
    builtin: bool = False
    description: str | None = None
    file_name: str | None = None
    format: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    fingerprint: str | None = None
    num_train: int | None = None
    num_test: int | None = None
    classes: list[str] | None = None
    input_shape: list[int] | None = None
    resize: list[int] | None = Field(None, description="(height, width) every image was resized to at upload")
    created_at: dt.datetime | None = None


class DatasetList(BaseModel):
    items: list[DatasetOut]


class ArchitectureOut(BaseModel):
    name: str
    description: str
    family: str
    min_input_size: int
    params_cifar10: int = Field(description="parameters at 10 classes, 3×32×32")


class PresetOut(BaseModel):
    name: str
    description: str
    spec: dict[str, Any]


def overrides_of(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional (None: keep the preset's or the default value), nested models
    likewise, and each field's constraints and description kept, its default stated: the job spec as
    users send it, documented in OpenAPI from the engine's own JobSpec, so the two never drift."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = overrides_of(annotation, f"{annotation.__name__}Overrides")
        elif info.metadata:
            annotation = Annotated[annotation, *info.metadata]
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        described = (info.description or field_name.replace("_", " ")).rstrip(".")
        if default is not PydanticUndefined:
            described += f". Default: {default!r}" if not isinstance(default, dict) else ""
        fields[field_name] = (annotation | None, Field(None, description=described))
    return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=model.__doc__, **fields)


JobSpecOverrides = overrides_of(JobSpec, "JobSpecOverrides")


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"preset": "digits-demo", "spec": {"epochs": 4}},
                {"preset": "cifar10-resnet18", "dataset": "ds_0123456789abcdef0123", "spec": {"epochs": 100, "peeraid": {"tau": 3}}},
            ]
        },
    )

    dataset: Reference | None = Field(
        None,
        description="a built-in dataset (digits, cifar10, cifar100, tinyimagenet), or one of your uploads by id or by name; "
        "default: the preset's",
    )
    preset: Name | None = Field(None, description="start from a named preset (see /v1/presets)")
    spec: JobSpecOverrides = Field(  # type: ignore[valid-type]
        default_factory=JobSpecOverrides,
        description="job-spec fields to change, merged over the preset (nested objects field by field); omitted fields keep "
        "the preset's value, or the default stated on each field",
    )


class Refusal(BaseModel):
    field: str = Field(description="the job-spec field to change")
    message: str = Field(description="which limit the job breaks, and how to change it")


class EstimateOut(BaseModel):
    student_parameters: int
    peer_parameters: int
    flops_per_training_image: float = Field(description="arithmetic of one training image's step, attack included")
    training_flops: float
    evaluation_flops: float
    evaluation_passes: int = Field(description="forward-equivalent passes of the final report, per model")
    memory_bytes: int = Field(description="at the batch size: weights, gradients and momentum of both networks, activations, the data")
    hours: dict[str, float] = Field(description="estimated hours per device class (h100, cpu), from measured step rates")
    evaluation_hours: dict[str, float] = Field(description="of those hours, the final evaluation's (clean, FGSM, PGD, AutoAttack)")
    warnings: list[str]


class PreflightOut(BaseModel):
    admitted: bool = Field(description="whether POST /v1/jobs would accept it now (the tenant's count of active jobs aside)")
    spec: dict[str, Any] = Field(description="the resolved job spec: the preset with your changes")
    dataset: str
    dataset_id: str | None
    device: str = Field(description="the device class the limits are checked on")
    estimate: EstimateOut
    refusals: list[Refusal]


class JobSummary(Out):
    """A job in a list: its state and progress; GET /v1/jobs/{id} has the rest (spec, report, evaluation, ...)."""

    id: str
    status: JobStatus
    phase: str
    dataset: str = Field(validation_alias="dataset_name")
    dataset_id: str | None
    preset: str | None
    progress: JobProgress
    latest_metrics: dict[str, Any] | None
    warnings: list[dict[str, str]] | None = Field(
        None, description="outcomes to distrust, e.g. a model at chance: [{model, kind, message, advice}]"
    )
    error: str | None
    attempts: int
    cancel_requested: bool
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime


class JobOut(JobSummary):
    """A job in full: its summary, and the spec, the reports and the estimate."""

    spec: dict[str, Any]
    best_metrics: dict[str, Any] | None
    result: dict[str, Any] | None = Field(description="the test-set report: {model: {best_epoch, validation, test}}")
    evaluation: dict[str, Any] | None = Field(
        None,
        description="what the report covers: status (complete / incomplete / pending), images per attack, failed attacks, "
        "the AutoAttack set used",
    )
    execution: dict[str, Any] | None = Field(None, description="how the training steps ran: precision, CUDA graph or eager (and why)")
    estimate: dict[str, Any] | None = Field(None, description="the pre-flight estimate made at submission")


def columns_of(model: type[BaseModel]) -> tuple[Any, ...]:
    """The job columns a response model is made of (the dataset's name comes from dataset_name), for reads without the ORM."""
    return tuple(
        getattr(Job, field.validation_alias if isinstance(field.validation_alias, str) else name)
        for name, field in model.model_fields.items()
    )


JOB_VIEW = columns_of(JobOut)
JOB_LISTING = JobListing(columns_of(JobSummary))  # GET /v1/jobs and the web page's list


class JobList(BaseModel):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int


class EpochMetricOut(Out):
    epoch: int
    attempt: int
    record: dict[str, Any]


class ArtifactOut(Out):
    name: str
    file_name: str
    media_type: str
    size_bytes: int
    sha256: str
    created_at: dt.datetime
    url: str = ""
