"""Tenants cannot see, cancel or download each other's things; bad input gets a 4xx naming the problem;
idempotent job creation; health, readiness, metrics and key revocation."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest

from tests.stack import FAST_JOB, UPLOAD_LIMIT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(stack):
    """A tenant of its own for the tests that only need one."""
    return stack.new_tenant()


@pytest.fixture(scope="module")
def owner_with_finished_job(stack, digits_npz_bytes):
    owner = stack.new_tenant()
    dataset = owner.post("/v1/datasets", params={"name": "mine"}, content=digits_npz_bytes).json()
    job = owner.post("/v1/jobs", json={"preset": "digits-demo", "dataset": dataset["id"], "spec": {**FAST_JOB, "epochs": 2, "lr_decay_epochs": [1]}}).json()
    stack.wait_for_job(owner, job["id"], "succeeded")
    return owner, dataset, job


def test_another_tenant_gets_404_for_everything(stack, owner_with_finished_job):
    owner, dataset, job = owner_with_finished_job
    intruder = stack.new_tenant()
    jid, did = job["id"], dataset["id"]
    for method, path in [
        ("GET", f"/v1/datasets/{did}"), ("DELETE", f"/v1/datasets/{did}"),
        ("GET", f"/v1/jobs/{jid}"), ("GET", f"/v1/jobs/{jid}/metrics"), ("GET", f"/v1/jobs/{jid}/events"),
        ("POST", f"/v1/jobs/{jid}/cancel"), ("DELETE", f"/v1/jobs/{jid}"),
        ("GET", f"/v1/jobs/{jid}/artifacts"), ("GET", f"/v1/jobs/{jid}/artifacts/student"),
    ]:
        response = intruder.request(method, path)
        assert response.status_code == 404, (method, path, response.status_code)
        assert jid not in response.text or "not found" in response.text
    assert jid not in [j["id"] for j in intruder.get("/v1/jobs").json()["items"]]
    assert did not in [d["id"] for d in intruder.get("/v1/datasets").json()["items"]]
    response = intruder.post("/v1/jobs", json={"preset": "digits-demo", "dataset": did})
    assert response.status_code == 422 and "unknown dataset" in response.text
    # and nothing of the owner's changed
    assert owner.get(f"/v1/jobs/{jid}").json()["status"] == "succeeded"
    assert owner.get(f"/v1/jobs/{jid}/artifacts/student").status_code == 200


def test_no_key_or_a_revoked_key_gets_401(stack, owner_with_finished_job):
    _, _, job = owner_with_finished_job
    anonymous = stack.client(None)
    for path in ["/v1/jobs", f"/v1/jobs/{job['id']}", "/v1/datasets", "/v1/presets", "/v1/architectures"]:
        assert anonymous.get(path).status_code == 401
    assert stack.client("pk_0000_nonsense").get("/v1/jobs").status_code == 401
    key = stack.admin("create-key", "short-lived")
    assert stack.client(key).get("/v1/jobs").status_code == 200
    stack.admin("revoke-key", key.split("_")[1])
    response = stack.client(key).get("/v1/jobs")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "body,field,fragment",
    [
        ({"preset": "digits-demo", "spec": {"epsilon": 3}}, "epsilon", "less than or equal to 0.5"),
        ({"preset": "digits-demo", "spec": {"student": "resnet9000"}}, "student", "unknown architecture"),
        ({"preset": "digits-demo", "spec": {"epochs": "many"}}, "epochs", "valid integer"),
        ({"preset": "digits-demo", "spec": {"warp": 9}}, "warp", "unknown field"),
        ({"preset": "no-such-preset"}, "preset", "unknown preset"),
        ({"preset": "digits-demo", "dataset": "ds_missing"}, "dataset", "unknown dataset"),
        ({"preset": "digits-demo", "specs": {}}, "specs", "Extra inputs"),
    ],
)
def test_invalid_job_specs_are_422_naming_the_field(client, body, field, fragment):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in ".".join(map(str, d["loc"])) and fragment in d["msg"] for d in detail), detail


def zip_with(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD = dict(x_train=np.zeros((8, 4, 4, 1), np.uint8), y_train=np.arange(8) % 2, x_test=np.zeros((2, 4, 4, 1), np.uint8), y_test=np.arange(2))


@pytest.mark.parametrize(
    "filename,content,fragment",
    [
        ("broken.zip", zip_with({"a/x.png": b"x" * 100})[:60], "broken.zip"),
        ("notes.txt", b"hello, these are not images", "unrecognised file format"),
        ("evil.zip", zip_with({"../evil/x.png": b"123"}), "evil.zip"),
        ("text.zip", zip_with({"cats/readme.txt": b"meow", "dogs/readme.txt": b"woof"}), "readme.txt"),
        ("nan.npz", npz(**{**GOOD, "x_train": np.full((8, 4, 4, 1), np.nan, np.float32)}), "NaN"),
        ("keys.npz", npz(x_train=GOOD["x_train"]), "y_train"),
        ("pickled.npz", npz(**{**GOOD, "y_test": np.array([object(), 1], dtype=object)}), "pickled.npz"),
        ("empty.bin", b"", "empty"),
    ],
)
def test_invalid_uploads_are_4xx_naming_the_file(stack, client, filename, content, fragment):
    before = client.get("/v1/datasets").json()["items"]
    response = client.post("/v1/datasets", params={"name": "bad", "filename": filename}, content=content)
    assert 400 <= response.status_code < 500, response.text
    assert fragment in response.json()["detail"], response.json()
    assert filename in response.json()["detail"] or fragment in response.json()["detail"]
    assert client.get("/v1/datasets").json()["items"] == before
    assert str(stack.data_dir) not in response.text, "server paths must not leak"


def test_an_upload_over_the_limit_is_413_and_leaves_nothing_behind(stack, client):
    before = client.get("/v1/datasets").json()["items"]
    blob = os.urandom(UPLOAD_LIMIT + 1)

    def chunks():  # no Content-Length: the server must cut the stream itself
        for start in range(0, len(blob), 1 << 20):
            yield blob[start : start + (1 << 20)]

    for content in (blob, chunks()):
        response = client.post("/v1/datasets", params={"name": "huge", "filename": "huge.zip"}, content=content)
        assert response.status_code == 413, response.text
        assert "huge.zip" in response.json()["detail"] and str(UPLOAD_LIMIT) in response.json()["detail"]
    assert client.get("/v1/datasets").json()["items"] == before
    leftovers = [p for p in (stack.data_dir / "datasets").rglob("*") if p.is_file()] if (stack.data_dir / "datasets").exists() else []
    assert not [p for p in leftovers if p.name.endswith(".partial") or p.stat().st_size > UPLOAD_LIMIT]


def test_idempotency_key_makes_retries_safe(client):
    body = {"preset": "digits-demo", "spec": {**FAST_JOB, "epochs": 2, "lr_decay_epochs": [1]}}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-me"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-me"})
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={**body, "spec": {**body["spec"], "epochs": 3, "lr_decay_epochs": [2]}},
                        headers={"Idempotency-Key": "retry-me"})
    assert other.status_code == 409
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")


def test_list_jobs_paginates_and_filters(stack, owner_with_finished_job):
    owner, _, job = owner_with_finished_job
    page = owner.get("/v1/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert page["total"] >= 1 and len(page["items"]) == 1 and page["items"][0]["status"] == "succeeded"
    assert owner.get("/v1/jobs", params={"status": "exploded"}).status_code == 422
    assert owner.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_catalog_health_readiness_and_metrics(client):
    names = {a["name"] for a in client.get("/v1/architectures").json()}
    assert {"resnet18", "wrn34_10", "small_cnn"} <= names
    assert "cifar10-resnet18" in {p["name"] for p in client.get("/v1/presets").json()}
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    metrics = client.get("/metrics").text
    assert "peeraid_http_requests_total" in metrics and 'peeraid_jobs{status="succeeded"}' in metrics
    assert client.get("/docs").status_code == 200 and "/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_delete_a_finished_job_and_a_dataset(stack, digits_npz_bytes):
    client = stack.new_tenant()
    dataset = client.post("/v1/datasets", params={"name": "tmp"}, content=digits_npz_bytes).json()
    job = client.post("/v1/jobs", json={"preset": "digits-demo", "dataset": dataset["id"],
                                        "spec": {**FAST_JOB, "epochs": 30, "lr_decay_epochs": [20]}}).json()
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 409  # in use
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409  # still active
    client.post(f"/v1/jobs/{job['id']}/cancel")
    stack.wait_for_job(client, job["id"], "cancelled", timeout=120)
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert client.delete("/v1/datasets/digits").status_code == 405
