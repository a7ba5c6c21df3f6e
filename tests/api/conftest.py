"""The in-process tier: the real application (`create_app(settings)`) under FastAPI's TestClient, on a
real SQLite database with the embedded broker, no server processes. A job that must have finished is
run by the worker's own runner in this process (the engine, the lease, the database; no Celery)."""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette announces its move to httpx2; the TestClient works as is
    from fastapi.testclient import TestClient

from api.main import create_app
from core.db import tenants
from core.db.models import Job
from core.db.session import database
from core.settings import Settings
from service.cli import migrate
from tests.stack import FAST_JOB, UPLOAD_LIMIT
from worker import runner

OPERATOR_TOKEN = "op-" + secrets.token_hex(8)
AUTH_CACHE_SECONDS = 0.5  # short, so that a revoked key's refusal is seen quickly


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("api"),
        public_url="http://testserver",
        operator_token=OPERATOR_TOKEN,
        auth_cache_seconds=AUTH_CACHE_SECONDS,
        max_upload_bytes=UPLOAD_LIMIT,
        worker_device="cpu",
        allow_downloads=False,
        heartbeat_interval=0.5,
        progress_interval=0.5,
    )
    migrate(settings)
    return settings


@pytest.fixture(scope="session")
def app(settings: Settings):
    return create_app(settings)


def create_key(settings: Settings, tenant: str | None = None) -> str:
    with database(settings.resolved_database_url).transaction() as session:
        tenant_row = tenants.get_or_create_tenant(session, tenant or f"tenant-{secrets.token_hex(4)}")
        return tenants.create_api_key(session, tenant_row)[1]


@pytest.fixture(scope="session")
def new_client(app, settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """new_client() → a TestClient signed with a new tenant's key; new_client(None) → no key."""
    clients: list[TestClient] = []

    def make(key: str | None = "new") -> TestClient:
        key = create_key(settings) if key == "new" else key
        # entered: one event loop for all of this client's requests (asyncio connections belong to their loop)
        client = TestClient(app, headers={"Authorization": f"Bearer {key}"} if key else {}).__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(new_client) -> TestClient:
    return new_client()


def run_job_here(settings: Settings, job_id: str) -> dict:
    """What a worker would do with the job's message, in this process."""
    outcome = runner.run(settings, job_id)
    with database(settings.resolved_database_url).transaction() as session:
        assert session.get_one(Job, job_id).status == outcome, outcome
    return {"status": outcome}


@pytest.fixture(scope="session")
def finished(new_client, settings: Settings, digits_npz_bytes: bytes) -> tuple[TestClient, dict, dict]:
    """A tenant's client, its uploaded dataset and a job on it that succeeded."""
    owner = new_client()
    dataset = owner.post("/v1/datasets", params={"name": "owned", "filename": "digits.npz"}, content=digits_npz_bytes)
    assert dataset.status_code == 201, dataset.text
    response = owner.post(
        "/v1/jobs",
        json={"preset": "digits-demo", "dataset": dataset.json()["id"], "spec": {**FAST_JOB, "epochs": 2, "lr_decay_epochs": [1]}},
    )
    assert response.status_code == 201, response.text
    assert run_job_here(settings, response.json()["id"])["status"] == "succeeded"
    return owner, dataset.json(), owner.get(f"/v1/jobs/{response.json()['id']}").json()
