"""Jobs through the API without a worker: idempotent submission, the tenant's limit, listing, cancelling
a queued job, deleting jobs and datasets; the catalog, health, readiness and metrics."""

from __future__ import annotations

import json
import re

from api.main import create_app
from core.db import tenants
from core.db.session import database
from tests.stack import FAST_JOB

from .conftest import OPERATOR_TOKEN, TestClient, create_key, run_job_here

SHORT = {"preset": "digits-demo", "spec": {**FAST_JOB, "epochs": 2, "lr_decay_epochs": [1]}}


def test_idempotency_key_makes_retries_safe(client):
    first = client.post("/v1/jobs", json=SHORT, headers={"Idempotency-Key": "retry-me"})
    again = client.post("/v1/jobs", json=SHORT, headers={"Idempotency-Key": "retry-me"})
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post(
        "/v1/jobs", json={**SHORT, "spec": {**SHORT["spec"], "epochs": 3, "lr_decay_epochs": [2]}}, headers={"Idempotency-Key": "retry-me"}
    )
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel").json()["status"] == "cancelled"


def test_the_tenant_limit_answers_429_and_the_upload_limit_413(new_client, settings, digits_npz_bytes):
    key = create_key(settings, "limited")
    with database(settings.resolved_database_url).transaction() as session:
        tenants.set_limits(session, tenants.get_or_create_tenant(session, "limited"), max_concurrent_jobs=1, max_upload_bytes=100_000)
    client = new_client(key)
    first = client.post("/v1/jobs", json=SHORT)
    assert first.status_code == 201
    second = client.post("/v1/jobs", json=SHORT)
    assert second.status_code == 429 and "limit 1" in second.json()["detail"] and second.headers["retry-after"] == "60"
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    assert client.post("/v1/jobs", json=SHORT).status_code == 201  # a cancelled job no longer counts
    too_big = client.post("/v1/datasets", params={"name": "big", "filename": "digits.npz"}, content=digits_npz_bytes)
    assert too_big.status_code == 413 and "100000" in too_big.json()["detail"]


def test_list_jobs_paginates_and_filters(new_client):
    client = new_client()
    ids = [client.post("/v1/jobs", json=SHORT).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == ids[::-1][:2]
    assert [j["id"] for j in client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()["items"]] == [ids[0]]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert cancelled["total"] == 1 and cancelled["items"][0]["id"] == ids[0]
    assert client.get("/v1/jobs", params={"status": "exploded"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    for job_id in ids[1:]:
        client.post(f"/v1/jobs/{job_id}/cancel")


def test_cancel_and_delete_a_queued_job_and_a_dataset(new_client, settings, digits_npz_bytes):
    client = new_client()
    dataset = client.post("/v1/datasets", params={"name": "tmp"}, content=digits_npz_bytes).json()
    job = client.post("/v1/jobs", json={**SHORT, "dataset": dataset["id"]}).json()
    assert job["status"] == "queued" and job["dataset_id"] == dataset["id"]
    response = client.delete(f"/v1/datasets/{dataset['id']}")
    assert response.status_code == 409 and "used by 1 queued or running job" in response.json()["detail"]
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 409 and "cancel it first" in response.json()["detail"]
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"] and cancelled["finished_at"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert not (settings.data_dir / "datasets" / dataset["id"]).exists()
    assert client.delete("/v1/datasets/digits").status_code == 405


def test_catalog_health_readiness_and_metrics(client):
    names = {a["name"] for a in client.get("/v1/architectures").json()}
    assert {"resnet18", "wrn34_10", "small_cnn"} <= names
    assert "cifar10-resnet18" in {p["name"] for p in client.get("/v1/presets").json()}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}  # hosts and errors only for the operator
    assert client.get("/metrics").status_code == 401  # a tenant's key does not show cross-tenant counts
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    ready = client.get("/readyz", headers=operator)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    metrics = client.get("/metrics", headers=operator).text
    assert 'peeraid_http_requests_total{method="GET",route="/v1/architectures",status="200"}' in metrics
    assert 'peeraid_jobs{status="queued"}' in metrics
    assert client.get("/docs").status_code == 200 and "/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_datasets_are_named_by_id_or_by_name_and_a_name_is_unique_per_tenant(new_client, settings, digits_npz_bytes):
    client = new_client()
    first = client.post("/v1/datasets", params={"name": "pets"}, content=digits_npz_bytes).json()
    by_name = client.post("/v1/jobs", json={**SHORT, "dataset": "pets"})
    assert by_name.status_code == 201 and by_name.json()["dataset_id"] == first["id"]
    assert by_name.json()["spec"]["dataset"] == first["id"] and by_name.json()["dataset"] == "pets"
    assert run_job_here(settings, by_name.json()["id"])["status"] == "succeeded"  # the worker finds it

    stored = {p for p in (settings.data_dir / "datasets").rglob("*") if p.is_file()}
    again = client.post("/v1/datasets", params={"name": "pets"}, content=digits_npz_bytes)
    assert again.status_code == 409, again.text
    assert again.json()["detail"] == (
        f"you already have a dataset named 'pets' ({first['id']}): upload under another name, or delete that one first"
    )
    assert {p for p in (settings.data_dir / "datasets").rglob("*") if p.is_file()} == stored, "nothing of the refused upload stays"
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"] if d["name"] == "pets"] == [first["id"]]
    assert client.post("/v1/jobs", json={**SHORT, "dataset": "pets"}).json()["dataset_id"] == first["id"], "the name still works"

    unnamed = client.post("/v1/datasets", params={"filename": "cats.npz"}, content=digits_npz_bytes)  # named after its file
    assert unnamed.status_code == 201 and unnamed.json()["name"] == "cats"
    assert client.post("/v1/datasets", params={"filename": "cats.npz"}, content=digits_npz_bytes).status_code == 409
    builtin = client.post("/v1/datasets", params={"name": "digits"}, content=digits_npz_bytes)
    assert builtin.status_code == 409 and "built-in" in builtin.json()["detail"], builtin.text

    other_tenant = new_client().post("/v1/datasets", params={"name": "pets"}, content=digits_npz_bytes)
    assert other_tenant.status_code == 201, "names are unique per tenant, not across tenants"
    client.delete(f"/v1/jobs/{by_name.json()['id']}")
    for job in client.get("/v1/jobs").json()["items"]:
        client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/datasets/{first['id']}").status_code == 204
    reused = client.post("/v1/datasets", params={"name": "pets"}, content=digits_npz_bytes)
    assert reused.status_code == 201, "a deleted dataset's name is free again"


def test_artifacts_of_an_unfinished_job_are_a_conflict_not_missing(client):
    job = client.post("/v1/jobs", json=SHORT).json()
    assert client.get(f"/v1/jobs/{job['id']}/artifacts").json() == []
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/student")
    assert response.status_code == 409 and "queued" in response.json()["detail"]
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.get(f"/v1/jobs/{job['id']}/artifacts/student").status_code == 404


def test_the_docs_work_offline(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


def test_a_job_past_its_time_limit_fails_keeping_its_last_students(new_client, settings):
    client = new_client()
    job = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": {**FAST_JOB, "epochs": 200, "lr_decay_epochs": [150]}}).json()
    assert run_job_here(settings.model_copy(update={"max_job_seconds": 8}), job["id"])["status"] == "failed"
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert "time limit of 8s (PEERAID_MAX_JOB_SECONDS)" in done["error"]
    artifacts = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    if client.get(f"/v1/jobs/{job['id']}/metrics").json():  # an epoch finished in time (on a loaded machine it may not)
        assert "student is kept" in done["error"] and {"last_student", "student", "model_card"} <= artifacts
        assert "time limit" in json.dumps(client.get(f"/v1/jobs/{job['id']}/artifacts/model_card").json())
    else:
        assert "no model is kept" in done["error"] and artifacts == set()


def test_a_job_past_its_memory_ceiling_fails_cleanly(new_client, settings):
    client = new_client()
    job = client.post("/v1/jobs", json=SHORT).json()
    assert run_job_here(settings.model_copy(update={"worker_max_memory_bytes": 1 << 20}), job["id"])["status"] == "failed"
    assert "memory ceiling of 0.0 GiB" in client.get(f"/v1/jobs/{job['id']}").json()["error"]


def test_preflight_estimates_without_submitting(client):
    response = client.post("/v1/jobs/preflight", json={"preset": "digits-demo", "spec": {"epochs": 4}})
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["admitted"] and plan["refusals"] == [] and plan["spec"]["epochs"] == 4 and plan["dataset"] == "digits"
    estimate = plan["estimate"]
    assert estimate["student_parameters"] == estimate["peer_parameters"] > 10_000 and estimate["memory_bytes"] > 0
    assert set(estimate["hours"]) == {"h100", "cpu"} and 0 < estimate["hours"]["h100"] < estimate["hours"]["cpu"]
    submitted = [client.get(f"/v1/jobs/{j['id']}").json() for j in client.get("/v1/jobs").json()["items"]]
    assert all(j["spec"]["epochs"] != 4 for j in submitted), "a preflight submits nothing"
    bigger = client.post("/v1/jobs/preflight", json={"preset": "digits-demo", "spec": {"epochs": 8}}).json()["estimate"]
    assert bigger["training_flops"] > 1.9 * estimate["training_flops"]  # the work follows the epochs


def test_admission_refuses_what_breaks_a_limit_naming_it(app, new_client, settings, digits_npz_bytes):
    strict = create_app(
        settings.model_copy(
            update={"max_job_memory_bytes": 50 * 2**20, "max_evaluation_passes": 100_000, "max_input_side": 12, "estimate_device": "cpu"}
        )
    )
    key = create_key(settings, "strict")
    with database(settings.resolved_database_url).transaction() as session:
        tenants.set_limits(session, tenants.get_or_create_tenant(session, "strict"), max_job_hours=0.01)
    client = TestClient(strict, headers={"Authorization": f"Bearer {key}"})
    response = client.post(
        "/v1/jobs",
        json={
            "preset": "digits-demo",
            "spec": {"epochs": 40, "lr_decay_epochs": [30], "batch_size": 4096, "evaluation": {"pgd_steps": 500}},
        },
    )
    assert response.status_code == 422, response.text
    detail = {d["loc"][-1]: d["msg"] for d in response.json()["detail"]}
    assert "limit of 0.01 h per job" in detail["epochs"] and "--max-job-hours" in detail["epochs"]
    assert "batch_size" in detail["batch_size"] and "PEERAID_MAX_JOB_MEMORY_BYTES" in detail["batch_size"]
    assert "largest side of 12" in detail["dataset"] and "resize=" in detail["dataset"]
    assert "PEERAID_MAX_EVALUATION_PASSES" in detail["evaluation"]
    assert client.get("/v1/jobs").json()["total"] == 0
    plan = client.post("/v1/jobs/preflight", json={"preset": "digits-demo"}).json()
    assert not plan["admitted"] and plan["device"] == "cpu"


def test_the_client_sdk_and_cli_dry_run(new_client, app, settings, capsys):
    """The SDK's preflight_job and `peeraid jobs submit --dry-run` over this in-process app."""
    from peeraid_client import Client
    from peeraid_client.cli import print_preflight

    http = new_client()
    with Client("http://testserver", http.headers["authorization"].split()[1], transport=http._transport) as sdk:
        plan = sdk.preflight_job(preset="digits-demo", spec={"epochs": 3})
    assert plan["admitted"] and plan["spec"]["epochs"] == 3
    assert print_preflight(plan) == 0
    out = capsys.readouterr().out
    assert out.startswith("admitted: peeraid with a small_cnn student on 'digits', 3 epochs") and "h100" in out and "cpu" in out


def test_an_empty_idempotency_key_is_refused_naming_the_header(new_client):
    """`-H "Idempotency-Key: $(uuidgen)"` where uuidgen is missing sends an empty key: refused, not a job without one."""
    client = new_client()
    for blank in ("", "   "):
        response = client.post("/v1/jobs", json=SHORT, headers={"Idempotency-Key": blank})
        assert response.status_code == 422, response.text
        assert response.json() == {
            "detail": [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "Idempotency-Key: must not be empty; send a fresh unique value (a UUID) with each new job, "
                    "or leave the header out",
                    "type": "value_error",
                }
            ]
        }
    assert client.get("/v1/jobs").json()["total"] == 0, "no job was made"
