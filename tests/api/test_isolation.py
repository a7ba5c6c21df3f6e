"""Tenants cannot see, change or download each other's things (404, as if they did not exist); no key
or a revoked key gets 401 on every /v1 route (enumerated from the live OpenAPI schema, so new routes are
covered); keys are stored only as hashes."""

from __future__ import annotations

import time

from sqlalchemy import text

from core.db import tenants
from core.db.session import database

from .conftest import AUTH_CACHE_SECONDS, create_key


def v1_operations(client):
    for path, methods in client.get("/openapi.json").json()["paths"].items():
        if path.startswith("/v1/"):
            for method in methods:
                yield method.upper(), path


def test_every_route_checks_the_key_and_the_tenant(new_client, finished):
    owner, dataset, job = finished
    intruder, anonymous = new_client(), new_client(None)
    fill = {"{job_id}": job["id"], "{dataset_id}": dataset["id"], "{name}": "student"}
    checked = 0
    for method, template in v1_operations(owner):
        path = template
        for placeholder, value in fill.items():
            path = path.replace(placeholder, value)
        assert "{" not in path, f"the matrix does not know a placeholder in {template}; extend `fill`"
        response = anonymous.request(method, path)
        assert response.status_code == 401, (method, template, response.status_code)
        assert response.headers["www-authenticate"] == "Bearer"
        if path != template:  # the route names one of the owner's things
            response = intruder.request(method, path)
            assert response.status_code == 404, (method, template, response.status_code, response.text)
            assert "not found" in response.text
            checked += 1
    assert checked >= 9
    assert job["id"] not in [j["id"] for j in intruder.get("/v1/jobs").json()["items"]]
    assert dataset["id"] not in [d["id"] for d in intruder.get("/v1/datasets").json()["items"]]
    response = intruder.post("/v1/jobs", json={"preset": "digits-demo", "dataset": dataset["id"]})
    assert response.status_code == 422 and "unknown dataset" in response.text
    # and nothing of the owner's changed
    assert owner.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    assert owner.get(f"/v1/datasets/{dataset['id']}").status_code == 200
    assert owner.get(f"/v1/jobs/{job['id']}/artifacts/student").status_code == 200


def test_no_key_a_malformed_key_or_a_revoked_key_gets_401(new_client, settings):
    anonymous = new_client(None)
    for path in ["/v1/jobs", "/v1/datasets", "/v1/presets", "/v1/architectures"]:
        assert anonymous.get(path).status_code == 401
    assert new_client("pk_0000_nonsense").get("/v1/jobs").status_code == 401
    assert new_client("not-even-a-key").get("/v1/jobs").status_code == 401
    key = create_key(settings, "short-lived")
    client = new_client(key)
    assert client.get("/v1/jobs").status_code == 200
    with database(settings.resolved_database_url).transaction() as session:
        assert tenants.revoke_key(session, tenants.key_prefix(key))
    time.sleep(AUTH_CACHE_SECONDS)  # a valid key is remembered this long
    response = client.get("/v1/jobs")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_api_keys_are_stored_only_as_hashes(settings):
    key = create_key(settings, "hash-check")
    with database(settings.resolved_database_url).transaction() as session:
        rows = session.execute(text("SELECT prefix, key_hash FROM api_keys")).all()
    secret = key.split("_", 2)[2]
    assert rows and all(secret not in (prefix + key_hash) for prefix, key_hash in rows)
    assert any(key.split("_")[1] == prefix for prefix, _ in rows)
