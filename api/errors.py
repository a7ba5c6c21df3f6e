"""One error body for every 4xx: {"detail": "..."}, or for field errors FastAPI's own validation shape
{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}, so clients parse one format.

Failures of the layers below (the service layer's refusals, a bad job spec, a tenant's job limit, acting on a
finished job, a database that cannot be reached) are mapped to their status here, once."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sqlalchemy_errors

from core.db.datasets import DatasetInUse
from core.db.errors import DatabaseUnavailable
from core.db.jobs import ActiveJobLimit, JobActive, JobFinished
from core.engine.errors import SpecError

from .services.errors import IdempotencyKeyReused, InvalidFields, InvalidUpload, NameTaken, OverLimit, ServiceError, UploadTimedOut

log = logging.getLogger(__name__)
# what says the database cannot serve now, whichever path asked: the drivers' connection failures (SQLAlchemy wraps
# them as OperationalError, SQLite's "database is locked" too), a pool with no connection free, the asyncpg reads'
DATABASE_UNAVAILABLE = (
    sqlalchemy_errors.OperationalError,
    sqlalchemy_errors.InterfaceError,
    sqlalchemy_errors.TimeoutError,
    DatabaseUnavailable,
)
DATABASE_RETRY_AFTER_SECONDS = 5
SERVICE_ERROR_STATUS: dict[type[ServiceError], int] = {
    InvalidUpload: status.HTTP_422_UNPROCESSABLE_CONTENT,
    NameTaken: status.HTTP_409_CONFLICT,
    IdempotencyKeyReused: status.HTTP_409_CONFLICT,
    OverLimit: status.HTTP_413_CONTENT_TOO_LARGE,
    UploadTimedOut: status.HTTP_408_REQUEST_TIMEOUT,
}


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    detail: str | list[FieldError]


ERROR_DESCRIPTIONS = {
    401: "Missing, malformed or revoked API key (send `Authorization: Bearer <key>`)",
    404: "No such job, dataset or artifact of yours (another tenant's things do not exist for you)",
    405: "Not allowed on this resource (built-in datasets cannot be deleted)",
    408: "The upload sent nothing for too long",
    409: "Conflicts with the current state (the detail says which)",
    410: "The file is no longer on disk",
    413: "Over a size limit or quota (the detail names it)",
    422: "Invalid input; `detail` names each field at fault",
    429: "A per-tenant limit is reached; retry after `Retry-After` seconds",
    503: "The database is unavailable; retry after `Retry-After` seconds",
}


def responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI declarations of the error answers a route can give, all with the one error body."""
    return {code: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def field_error_detail(errors: list[tuple[str, str]], *, within: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """FastAPI's validation shape for errors about body fields; `within=("spec",)` for job-spec fields, whose
    messages name them as `--set` does."""
    return [
        {
            "loc": ["body", *within, *(field.split(".") if field else [])],
            "msg": f"{field}: {message}" if field else message,
            "type": "value_error",
        }
        for field, message in errors
    ]


def _body(code: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def refused(_request: Request, err: ServiceError) -> JSONResponse:
        if isinstance(err, InvalidFields):
            return _body(status.HTTP_422_UNPROCESSABLE_CONTENT, field_error_detail(err.errors, within=err.within))
        return _body(SERVICE_ERROR_STATUS[type(err)], str(err))

    @app.exception_handler(SpecError)
    async def bad_spec(_request: Request, err: SpecError) -> JSONResponse:
        detail: list[dict[str, object]] = []
        for e in err.errors:  # the preset is a body field; everything else a field of the spec
            within = () if e["field"] in ("preset", "") else ("spec",)
            detail += field_error_detail([(e["field"], e["message"])], within=within)
        return _body(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)

    @app.exception_handler(ActiveJobLimit)
    async def too_many_jobs(_request: Request, err: ActiveJobLimit) -> JSONResponse:
        return _body(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"tenant limit reached: {err.active} jobs queued or running (limit {err.limit}); wait for one to finish or cancel one",
            {"Retry-After": "60"},
        )

    async def conflict(_request: Request, err: Exception) -> JSONResponse:
        return _body(status.HTTP_409_CONFLICT, str(err))

    for conflicting in (JobFinished, JobActive, DatasetInUse):
        app.add_exception_handler(conflicting, conflict)

    async def database_unavailable(request: Request, err: Exception) -> JSONResponse:
        return database_unavailable_response(request.method, request.url.path, err)

    for kind in DATABASE_UNAVAILABLE:
        app.add_exception_handler(kind, database_unavailable)


def database_unavailable_response(method: str, path: str, err: BaseException) -> JSONResponse:
    """503 with Retry-After for a request the database could not serve (routes and the edge alike): the operator's
    log says what failed; the client learns only that the database is away (no host names)."""
    log.warning("database unavailable for %s %s: %s", method, path, f"{type(err).__name__}: {err}".splitlines()[0])
    return _body(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "the database is unavailable; retry in a few seconds",
        {"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
    )
