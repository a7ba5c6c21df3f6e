"""A job's artifacts are described by one table (core.engine.artifacts.ARTIFACTS): the worker records each
file's name and media type from it, its storage key is built from the job's id and that file name, and the
download serves and documents what the table says."""

from __future__ import annotations

from core.db import jobs
from core.db.session import database
from core.engine.artifacts import ARTIFACTS, ARTIFACTS_DIR


def test_each_artifact_is_recorded_and_served_as_the_table_says(finished, settings):
    client, _, job = finished
    listing = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert {"student", "swa_student", "student_onnx", "student_pt2", "model_card", "model_card_markdown"} <= set(listing)
    with database(settings.resolved_database_url).transaction() as session:
        keys = {row.name: row.storage_key for row in jobs.artifacts(session, job["id"])}
    for name, artifact in listing.items():
        kind = ARTIFACTS[name]
        assert (artifact["file_name"], artifact["media_type"]) == (kind.file_name, kind.media_type), name
        assert keys[name] == f"jobs/{job['id']}/{ARTIFACTS_DIR}/{kind.file_name}"
        response = client.get(artifact["url"])
        assert response.status_code == 200 and response.headers["content-type"].split(";")[0] == kind.media_type.split(";")[0], name
        assert response.headers["content-disposition"].endswith(f'filename="{job["id"]}-{kind.file_name}"'), name


def test_the_download_documents_every_artifact_a_job_may_have(client):
    download = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]["get"]
    for name, kind in ARTIFACTS.items():
        assert f"`{name}` ({kind.file_name}, {kind.media_type}): {kind.description}" in download["description"]
