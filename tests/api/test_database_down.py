"""With its PostgreSQL unreachable the API answers 503 with Retry-After and says the database is
unavailable, on every path a request reads or writes it (the key lookup, the ORM sessions, the asyncpg
hot reads, submissions in a thread): a real PostgreSQL URL on a closed port, and a real database
dropped under a running app."""

from __future__ import annotations

import pytest

from api.main import create_app
from core.settings import Settings
from service.cli import migrate
from tests.stack import FAST_JOB, POSTGRES_GROUP, _postgres_available, free_port, require_services, throwaway_database

from .conftest import TestClient, create_key

pytestmark = pytest.mark.xdist_group(POSTGRES_GROUP)  # beside the other PostgreSQL tests (one restarts the server)


def assert_unavailable(response) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["retry-after"].isdigit(), response.headers
    assert response.json() == {"detail": "the database is unavailable; retry in a few seconds"}


def test_a_database_on_a_closed_port_answers_503(tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")
    with TestClient(create_app(settings), headers={"Authorization": "Bearer pk_0123456789ab_secret"}) as client:
        assert_unavailable(client.get("/v1/jobs"))
        assert_unavailable(client.post("/v1/jobs", json={"preset": "digits-demo"}))
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200  # alive, just not ready


def test_a_database_dropped_under_a_running_app_answers_503(tmp_path, digits_npz_bytes):
    require_services(_postgres_available())
    with throwaway_database() as (_, url):
        settings = Settings(data_dir=tmp_path, database_url=url, auth_cache_seconds=600, worker_device="cpu")
        migrate(settings)
        app = create_app(settings)
        with TestClient(app, headers={"Authorization": f"Bearer {create_key(settings)}"}) as client:
            job = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": FAST_JOB})
            assert job.status_code == 201, job.text
            job_id = job.json()["id"]
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # the key is remembered from here on

            import psycopg

            from tests.stack import PG_ADMIN_URL

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')

            assert_unavailable(client.get(f"/v1/jobs/{job_id}"))  # asyncpg
            assert_unavailable(client.get("/v1/jobs"))
            assert_unavailable(client.get(f"/v1/jobs/{job_id}/metrics"))  # an ORM session on the event loop
            assert_unavailable(client.post(f"/v1/jobs/{job_id}/cancel"))
            assert_unavailable(client.post("/v1/jobs", json={"preset": "digits-demo", "spec": FAST_JOB}))  # in a thread
            assert_unavailable(client.post("/v1/datasets", params={"name": "d"}, content=digits_npz_bytes))
            assert_unavailable(client.get("/v1/datasets"))
            assert client.get("/readyz").status_code == 503
        assert not list((tmp_path / "datasets").rglob("*.*")), "the refused upload left no file"
