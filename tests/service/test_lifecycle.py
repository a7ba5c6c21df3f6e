"""The whole service with real processes, on both deployments: upload → submit → progress →
succeeded → download → the weights load and give the reported accuracy; cancel; a killed worker."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import threading
import time

import pytest

from core.engine.evaluation import accuracies, evaluation_sample
from core.engine.export import load_model
from core.engine.sources import load_splits
from tests.stack import FAST_JOB, wait_until

pytestmark = pytest.mark.slow


def upload(client, data: bytes, name="digits-npz", filename="digits.npz"):
    return client.post(
        "/v1/datasets", params={"name": name, "filename": filename}, content=data, headers={"Content-Type": "application/octet-stream"}
    )


def test_full_lifecycle_on_an_uploaded_dataset(stack, digits_npz_bytes, tmp_path):
    client = stack.new_tenant()
    response = upload(client, digits_npz_bytes)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["format"] == "npz" and dataset["num_train"] == 1438 and dataset["input_shape"] == [1, 16, 16]
    assert dataset["sha256"] == hashlib.sha256(digits_npz_bytes).hexdigest()
    assert dataset["id"] in [d["id"] for d in client.get("/v1/datasets").json()["items"]]

    spec = {**FAST_JOB, "evaluation": {"n_examples": 40, "autoattack": True, "batch_size": 40}}
    response = client.post("/v1/jobs", json={"preset": "digits-demo", "dataset": dataset["id"], "spec": spec})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["dataset_id"] == dataset["id"]

    seen = []
    events = threading.Thread(target=lambda: seen.extend(read_events(client, job["id"])), daemon=True)
    events.start()
    running = stack.wait_for_job(client, job["id"], ("running", "evaluating", "succeeded"), timeout=120)
    assert running["attempts"] == 1
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"]["images_per_sec"], 120, "progress")
    done = stack.wait_for_job(client, job["id"], "succeeded")
    events.join(timeout=30)

    assert done["progress"]["epoch"] == 4 and done["progress"]["fraction"] == 1.0
    assert done["finished_at"] and done["error"] is None
    report = done["result"]["student"]["test"]
    assert set(report) == {"clean_acc", "fgsm_acc", "pgd20_acc", "autoattack_acc"}
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert {"clean_acc", "pgd_acc"} <= set(metrics[-1]["record"]["student"])

    statuses = [e["status"] for kind, e in seen if kind == "job"]
    assert "running" in statuses and statuses[-1] == "succeeded" and seen[-1][0] == "end"

    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert set(artifacts) == {
        "student",
        "swa_student",
        "peer",
        "model_card",
        "model_card_markdown",
        "student_onnx",
        "student_pt2",
        "swa_student_onnx",
        "swa_student_pt2",
    }
    assert artifacts["model_card_markdown"]["media_type"].startswith("text/markdown")
    download = client.get(artifacts["student"]["url"])
    assert download.status_code == 200
    assert int(download.headers["content-length"]) == artifacts["student"]["size_bytes"] == len(download.content)
    assert download.headers["x-content-sha256"] == hashlib.sha256(download.content).hexdigest() == artifacts["student"]["sha256"]
    weights = tmp_path / "student.safetensors"
    weights.write_bytes(download.content)
    model, _ = load_model(weights)

    card = client.get(artifacts["model_card"]["url"]).json()
    assert card["dataset"]["fingerprint"] == dataset["fingerprint"] and card["metrics"] == done["result"]
    assert card["dataset"]["name"] == "digits-npz" and card["dataset"]["id"] == dataset["id"] and card["job_id"] == job["id"]
    splits = load_splits(str(write(tmp_path / "digits.npz", digits_npz_bytes)), val_fraction=done["spec"]["val_fraction"])
    sample = evaluation_sample(splits.test, 40, None, done["spec"]["seed"])
    clean = accuracies(model, splits.test.subset(sample.index), {"clean": None})["clean"]
    assert clean == pytest.approx(report["clean_acc"], abs=1e-9)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def read_events(client, job_id):
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
                if kind == "end":
                    break
    return events


def test_cancel_a_running_job_stops_within_an_epoch(stack):
    client = stack.new_tenant()
    spec = {**FAST_JOB, "epochs": 40, "lr_decay_epochs": [30]}
    job = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": spec}).json()
    wait_until(lambda: len(client.get(f"/v1/jobs/{job['id']}/metrics").json()) >= 1, 180, "a first epoch")
    asked = time.monotonic()
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["cancel_requested"]
    epochs_at_cancel = len(client.get(f"/v1/jobs/{job['id']}/metrics").json())
    done = stack.wait_for_job(client, job["id"], ("cancelled", "failed", "succeeded"), timeout=60)
    more = len(client.get(f"/v1/jobs/{job['id']}/metrics").json()) - epochs_at_cancel
    print(f"\ncancel: the job was {done['status']} {time.monotonic() - asked:.1f} s after the request ({more} more epochs recorded)")
    assert done["status"] == "cancelled", done
    assert len(client.get(f"/v1/jobs/{job['id']}/metrics").json()) <= epochs_at_cancel + 1
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    kept = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert {"last_student", "student", "model_card"} <= set(kept), kept  # a cancelled job keeps its students
    weights = client.get(kept["last_student"]["url"])
    assert hashlib.sha256(weights.content).hexdigest() == kept["last_student"]["sha256"]


def test_cancel_a_queued_job(stack):
    client = stack.new_tenant()
    stack.kill_worker(signal.SIGTERM)  # nothing picks the job up meanwhile
    try:
        job = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": FAST_JOB}).json()
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
    finally:
        stack.start_worker()
    time.sleep(3)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_a_killed_worker_resumes_from_its_last_checkpoint(stack):
    client = stack.new_tenant()
    spec = {**FAST_JOB, "epochs": 8, "lr_decay_epochs": [6]}
    job = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": spec}).json()
    wait_until(lambda: len(client.get(f"/v1/jobs/{job['id']}/metrics").json()) >= 2, 180, "two epochs")
    stack.kill_worker(signal.SIGKILL)
    before = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    stack.start_worker()
    done = stack.wait_for_job(client, job["id"], ("succeeded", "failed"), timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["epoch"] for m in metrics] == list(range(1, 9)), "every epoch exactly once"
    first_attempt = [m["epoch"] for m in metrics if m["attempt"] == 1]
    assert first_attempt and first_attempt == [m["epoch"] for m in before][: len(first_attempt)]
    assert min(m["epoch"] for m in metrics if m["attempt"] == 2) >= len(before), "resumed, not restarted"


def test_each_job_gets_a_fresh_process_and_duplicate_messages_none(stack):
    """A job's process is replaced after it (GPU memory returned, no state carried over); a message for a job
    the worker cannot claim is dropped by the process that is there, in milliseconds (replacing the process
    after each cost about a second, and importing the engine first 1.5-2.6 s more)."""
    from core.db.session import database
    from core.settings import Settings
    from worker.queue import JobQueue

    client = stack.new_tenant()
    spec = {**FAST_JOB, "epochs": 1, "lr_decay_epochs": [], "evaluation": {"n_examples": 20, "autoattack": False}}
    jobs = [client.post("/v1/jobs", json={"preset": "digits-demo", "spec": spec}).json() for _ in range(2)]
    for job in jobs:
        stack.wait_for_job(client, job["id"], "succeeded")
    claimed = dict(re.findall(r"job (job_\w+) claimed by (\S+) ", stack.log_tail("worker.log", 10**7)))
    assert claimed[jobs[0]["id"]] != claimed[jobs[1]["id"]], "two jobs ran in one process"

    settings = Settings(
        data_dir=stack.data_dir,
        database_url=stack.env.get("PEERAID_DATABASE_URL"),
        broker_url=stack.env.get("PEERAID_BROKER_URL"),
        task_queue=stack.env.get("PEERAID_TASK_QUEUE", "peeraid-jobs"),
    )
    queue, db = JobQueue.for_settings(settings), database(settings.resolved_database_url)
    started = time.monotonic()
    for _ in range(12):
        assert queue.enqueue(db, jobs[0]["id"])

    def droppers():
        return re.findall(rf"job {jobs[0]['id']} not claimable by (\S+) ", stack.log_tail("worker.log", 10**7))

    wait_until(lambda: len(droppers()) >= 12, 120, "the worker to drop 12 duplicate messages")
    print(f"\n12 duplicate messages dropped in {time.monotonic() - started:.2f} s by {len(set(droppers()))} process")
    assert len(set(droppers())) == 1, f"duplicate messages cost a process each: {droppers()}"
