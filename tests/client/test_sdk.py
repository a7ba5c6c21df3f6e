"""The Python SDK against a real service: upload, submit, wait, checksum-verified downloads, typed
errors, idempotent retries over a connection that loses answers, rate limiting and cancellation."""

from __future__ import annotations

import hashlib
import secrets

import httpx
import pytest

from peeraid_client import (
    AuthenticationError,
    ChecksumMismatch,
    Client,
    Conflict,
    ConnectionFailed,
    NotFound,
    PayloadTooLarge,
    PeeraidError,
    RateLimited,
    ValidationError,
)

from .conftest import FAST_JOB, free_port

# The client is backend-agnostic: it runs against the production deployment (PostgreSQL + Redis).
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("stack", ["postgres-redis"], indirect=True)]

LONG_JOB = {**FAST_JOB, "epochs": 60, "lr_decay_epochs": [50]}  # runs until cancelled


def test_upload_submit_and_wait(sdk, finished_job, digits_npz_bytes):
    dataset, job = finished_job
    assert dataset["name"] == "sdk-digits" and dataset["file_name"] == "my digits _v1_.npz"
    assert dataset["format"] == "npz" and dataset["num_train"] == 1438 and dataset["input_shape"] == [1, 16, 16]
    assert dataset["sha256"] == hashlib.sha256(digits_npz_bytes).hexdigest()
    assert sdk.get_dataset(dataset["id"])["fingerprint"] == dataset["fingerprint"]
    assert dataset["id"] in [d["id"] for d in sdk.list_datasets()]

    assert job["dataset_id"] == dataset["id"] and job["progress"]["fraction"] == 1.0
    assert set(job["result"]["student"]["test"]) >= {"clean_acc", "pgd20_acc"}
    assert [m["epoch"] for m in sdk.job_metrics(job["id"])] == [1, 2, 3, 4]
    assert sdk.get_job(job["id"])["status"] == "succeeded"
    assert job["id"] in [j["id"] for j in sdk.list_jobs(status="succeeded")["items"]]
    assert {p["name"] for p in sdk.list_presets()} >= {"digits-demo"}
    assert {a["name"] for a in sdk.list_architectures()} >= {"small_cnn", "resnet18"}


def test_events_and_wait_by_stream_and_by_polling(sdk, finished_job, capsys):
    _, job = finished_job
    events = list(sdk.events(job["id"]))
    assert [kind for kind, _ in events] == ["job", "end"]
    assert events[0][1]["id"] == job["id"] and events[1][1] == {"status": "succeeded"}

    assert sdk.wait(job["id"], stream=False)["status"] == "succeeded"
    assert sdk.wait(job["id"], progress=True)["status"] == "succeeded"
    bar = capsys.readouterr().err
    assert "100%" in bar and f"{job['id']} succeeded" in bar and "clean" in bar and "PGD" in bar


def test_downloads_are_verified_against_the_listing_and_the_header(sdk, finished_job, tmp_path):
    _, job = finished_job
    listing = {a["name"]: a for a in sdk.list_artifacts(job["id"])}
    assert set(listing) >= {"student", "swa_student", "peer", "model_card"}
    for name, artifact in listing.items():
        path = sdk.download_artifact(job["id"], name, tmp_path)
        assert path == tmp_path / f"{job['id']}-{artifact['file_name']}"
        data = path.read_bytes()
        assert len(data) == artifact["size_bytes"] and hashlib.sha256(data).hexdigest() == artifact["sha256"]
    explicit = sdk.download_artifact(job["id"], "student", tmp_path / "weights" / "robust.safetensors")
    assert explicit.read_bytes() == (tmp_path / f"{job['id']}-student.safetensors").read_bytes()
    into_new_dir = sdk.download_artifact(job["id"], "peer", f"{tmp_path}/new/")
    assert into_new_dir == tmp_path / "new" / f"{job['id']}-{listing['peer']['file_name']}"
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize("tamper", ["sha256", "size_bytes"])
def test_a_download_that_does_not_match_raises_and_leaves_nothing(sdk, finished_job, tmp_path, monkeypatch, tamper):
    _, job = finished_job
    real = sdk.list_artifacts(job["id"])

    def tampered(job_id):
        return [{**a, tamper: "0" * 64 if tamper == "sha256" else a["size_bytes"] + 1} for a in real]

    monkeypatch.setattr(sdk, "list_artifacts", tampered)
    target = tmp_path / "student.safetensors"
    with pytest.raises(ChecksumMismatch) as err:
        sdk.download_artifact(job["id"], "student", target)
    assert "student.safetensors" in str(err.value)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_curves_png(sdk, finished_job, tmp_path):
    _, job = finished_job
    path = sdk.download_curves(job["id"], tmp_path / "curves.png")  # a missing route is a NotFound: the failure this test is for
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_typed_errors_carry_the_service_message(stack, sdk, finished_job, tmp_path):
    _, job = finished_job
    with pytest.raises(AuthenticationError) as err:
        Client(stack.url, "pk_0000_nonsense").list_jobs()
    assert err.value.status_code == 401 and str(err.value) == (
        "the API key was refused (pk_0000_…, from the api_key argument): it is mistyped or was revoked"
    )

    with pytest.raises(NotFound) as err:
        sdk.get_job("job_doesnotexist")
    assert err.value.status_code == 404 and str(err.value) == "job job_doesnotexist not found"
    with pytest.raises(NotFound, match="has no artifact 'nope'"):
        sdk.download_artifact(job["id"], "nope", tmp_path)

    with pytest.raises(ValidationError) as err:
        sdk.submit_job(preset="digits-demo", spec={"epochs": -1, "peeraid": {"tau": "warm"}, "warp": 9})
    assert err.value.status_code == 422
    assert err.value.fields == ["epochs", "peeraid.tau", "warp"]
    assert dict(err.value.errors)["warp"] == "unknown field"
    assert "epochs: Input should be greater than or equal to 1" in str(err.value)
    with pytest.raises(ValidationError) as err:
        sdk.submit_job(preset="digits-demo", dataset="ds_missing")
    assert err.value.fields == ["dataset"] and "unknown dataset" in str(err.value)

    with pytest.raises(Conflict) as err:
        sdk.cancel_job(job["id"])
    assert err.value.status_code == 409 and str(err.value) == f"job {job['id']} already succeeded"

    with pytest.raises(PeeraidError) as err:
        sdk.delete_dataset("digits")
    assert err.value.status_code == 405 and "built in" in str(err.value)

    too_big = tmp_path / "big.npz"
    too_big.write_bytes(secrets.token_bytes(5_000_001))  # the stacks' upload limit is 5,000,000
    with pytest.raises(PayloadTooLarge, match="over the upload limit"):
        sdk.upload_dataset(too_big)

    with pytest.raises(ConnectionFailed, match="cannot reach"):
        Client(f"http://127.0.0.1:{free_port()}", "pk_x_y", retries=1, backoff=0.01).get_job(job["id"])


class LosesAnswers(httpx.BaseTransport):
    """A real connection to the service that, for job submissions, first lets the service create the
    job but loses its answer, then answers 503 itself, then behaves."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.submissions: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or request.url.path != "/v1/jobs":
            return self.inner.handle_request(request)
        self.submissions.append(request.headers.get("idempotency-key"))
        if len(self.submissions) == 1:
            self.inner.handle_request(request).read()
            raise httpx.ReadError("connection reset while reading the answer", request=request)
        if len(self.submissions) == 2:
            return httpx.Response(503, json={"detail": "upstream unavailable"}, request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_retries_reuse_the_idempotency_key_then_rate_limit_and_cancel(stack):
    transport = LosesAnswers()
    sdk = Client(stack.url, stack.admin("create-key", f"retry-{secrets.token_hex(4)}"), retries=3, backoff=0.05, transport=transport)

    first = sdk.submit_job(preset="digits-demo", spec=LONG_JOB)
    key = transport.submissions[0]
    assert len(transport.submissions) == 3 and set(transport.submissions) == {key} and key
    assert [j["id"] for j in sdk.list_jobs()["items"]] == [first["id"]], "one job however many times it was sent"
    assert sdk.submit_job(preset="digits-demo", spec=LONG_JOB, idempotency_key=key)["id"] == first["id"]
    with pytest.raises(Conflict, match="Idempotency-Key"):
        sdk.submit_job(preset="digits-demo", spec=FAST_JOB, idempotency_key=key)

    jobs = [first] + [sdk.submit_job(preset="digits-demo", spec=LONG_JOB) for _ in range(3)]
    with pytest.raises(RateLimited) as err:
        sdk.submit_job(preset="digits-demo", spec=LONG_JOB)
    assert err.value.status_code == 429 and err.value.retry_after == 60 and "limit 4" in str(err.value)

    with pytest.raises(TimeoutError):
        sdk.wait(jobs[-1]["id"], timeout=1.5)  # queued behind the first: no news within the timeout
    for job in jobs:
        assert sdk.cancel_job(job["id"])["cancel_requested"]
    assert {sdk.wait(job["id"], timeout=120)["status"] for job in jobs} == {"cancelled"}
    with pytest.raises(Conflict, match="already cancelled"):
        sdk.cancel_job(first["id"])
    sdk.delete_job(first["id"])
    with pytest.raises(NotFound):
        sdk.get_job(first["id"])
