"""A client generated from the live OpenAPI schema with openapi-python-client works end to end:
upload → submit → poll → download, typed models, clean method names, the curves endpoint included."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TestClient, run_job_here


@pytest.fixture(scope="module")
def generated(app, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    schema = folder / "openapi.json"
    schema.write_text(json.dumps(TestClient(app).get("/openapi.json").json()))
    config = folder / "config.yaml"
    config.write_text("content_type_overrides:\n  image/png: application/octet-stream\n")  # the curves image is bytes too
    bin_dir = str(Path(sys.executable).parent)  # the generator formats its output with ruff, installed beside python
    out = subprocess.run(
        [
            Path(bin_dir) / "openapi-python-client",
            "generate",
            "--path",
            schema,
            "--output-path",
            folder / "peeraid_api",
            "--meta",
            "none",
            "--config",
            config,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stdout + out.stderr, out.stdout + out.stderr  # every operation and answer was understood
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("peeraid_api")
    finally:
        sys.path.remove(str(folder))


@pytest.mark.slow  # generating the client (and formatting it with ruff) takes a few seconds
def test_a_generated_client_uploads_submits_polls_and_downloads(generated, app, settings, new_client, digits_npz_bytes):
    from peeraid_api import AuthenticatedClient
    from peeraid_api.api.artifacts import artifacts_download, artifacts_list
    from peeraid_api.api.datasets import datasets_upload
    from peeraid_api.api.jobs import jobs_create, jobs_curves, jobs_get
    from peeraid_api.models import JobCreate, JobSpecOverrides, JobStatus
    from peeraid_api.types import File

    http = new_client()  # a TestClient carrying a new tenant's key: the app in this process
    client = AuthenticatedClient(base_url="http://testserver", token="unused").set_httpx_client(http)

    dataset = datasets_upload.sync(
        client=client, body=File(payload=io.BytesIO(digits_npz_bytes), file_name="digits.npz"), name="generated", filename="digits.npz"
    )
    assert dataset.num_train == 1438 and dataset.input_shape == [1, 16, 16]

    spec = JobSpecOverrides.from_dict(
        {"epochs": 2, "lr_decay_epochs": [1], "attack_steps": 2, "eval_pgd_steps": 2, "evaluation": {"n_examples": 20, "autoattack": False}}
    )
    job = jobs_create.sync(client=client, body=JobCreate(preset="digits-demo", dataset=dataset.id, spec=spec), idempotency_key="gen-1")
    assert job.status == JobStatus.QUEUED and job.dataset_id == dataset.id

    run_job_here(settings, job.id)
    done = jobs_get.sync(job.id, client=client)
    assert done.status == JobStatus.SUCCEEDED

    listing = {a.name: a for a in artifacts_list.sync(job.id, client=client)}
    student = artifacts_download.sync(job.id, "student", client=client)
    assert hashlib.sha256(student.payload.read()).hexdigest() == listing["student"].sha256
    curves = jobs_curves.sync(job.id, client=client)
    assert curves.payload.read()[:8] == b"\x89PNG\r\n\x1a\n"
