"""A job's artifacts: robust student, SWA student and peer weights (safetensors), exports and the model card."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse

from core.db import jobs
from core.db.models import TERMINAL_STATUSES, Artifact, Job
from core.db.session import Database
from core.engine.artifacts import ARTIFACTS
from core.settings import Settings
from core.storage import Storage

from ..deps import ArtifactName, DatabaseDep, OwnedJob, SettingsDep, StorageDep
from ..errors import responses
from ..schemas import ArtifactOut

# The download's documentation names every artifact a job may have, from the engine's table.
ARTIFACT_LIST = "The artifacts a job may have:\n\n" + "\n".join(
    f"- `{name}` ({kind.file_name}, {kind.media_type}): {kind.description}" for name, kind in ARTIFACTS.items()
)
router = APIRouter(prefix="/v1/jobs/{job_id}/artifacts", tags=["artifacts"], responses=responses(401, 503))


def _out(artifact: Artifact, request: Request, settings: Settings) -> ArtifactOut:
    """With the download's absolute URL on the configured public URL (never the request's Host header)."""
    out = ArtifactOut.model_validate(artifact)
    path = request.app.url_path_for("artifacts_download", job_id=artifact.job_id, name=artifact.name)
    out.url = settings.resolved_public_url.rstrip("/") + str(path)
    return out


@router.get("", response_model=list[ArtifactOut], summary="List a job's artifacts with sizes and SHA-256", responses=responses(404, 422))
async def artifacts_list(job: OwnedJob, request: Request, db: DatabaseDep, settings: SettingsDep) -> list[ArtifactOut]:
    return [_out(a, request, settings) for a in await db.arun(lambda session: jobs.artifacts(session, job.id))]


@router.get(
    "/{name}",
    summary="Download an artifact (streamed; Content-Length and an X-Content-SHA256 header)",
    description=ARTIFACT_LIST,
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file's bytes; its SHA-256 in X-Content-SHA256",
        },
        **responses(404, 409, 410, 422),
    },
)
async def artifacts_download(job: OwnedJob, name: ArtifactName, db: DatabaseDep, storage: StorageDep) -> FileResponse:
    return await artifact_file(db, storage, job, name)


async def artifact_file(db: Database, storage: Storage, job: Job, name: str) -> FileResponse:
    """Streams one artifact of a job the caller already owns (the /v1 and the /ui downloads)."""
    artifact = await db.arun(lambda session: jobs.artifact(session, job.id, name))
    if artifact is None and job.status not in TERMINAL_STATUSES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is {job.status}: its artifacts are written when it finishes")
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no artifact {name!r}")
    path = storage.path(artifact.storage_key)  # from the database row, never from the request
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"artifact {name!r} of job {job.id} is no longer on disk")
    return FileResponse(
        path,
        media_type=artifact.media_type,
        filename=f"{job.id}-{artifact.file_name}",
        headers={"X-Content-SHA256": artifact.sha256, "ETag": f'"{artifact.sha256}"'},
    )
