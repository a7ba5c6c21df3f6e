"""Faults survived with real processes; each test ends with every job accounted for.

Kills land at chosen points through core/engine/faults.py (PEERAID_FAULTS) or at random moments;
Redis and PostgreSQL are really restarted (their tests need the local servers, PostgreSQL stack)."""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.stack import FAST_JOB, PG_ADMIN_URL, wait_until

pytestmark = pytest.mark.slow


def submit(client, **spec):
    response = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": {**FAST_JOB, **spec}})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def epochs_of(client, job_id):
    return client.get(f"/v1/jobs/{job_id}/metrics").json()


def assert_each_epoch_once(client, job_id, epochs):
    metrics = epochs_of(client, job_id)
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)), metrics


def replace_worker(stack, **extra_env):
    stack.kill_worker(signal.SIGKILL)
    stack.start_worker(extra_env or None)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(stack):
    client = stack.new_tenant()
    replace_worker(stack, PEERAID_FAULTS="write:checkpoint.safetensors:kill@3")  # dies inside epoch 2's checkpoint write
    try:
        job_id = submit(client, epochs=5, lr_decay_epochs=[4])
        wait_until(lambda: stack.worker.poll() is not None, 180, "the worker to kill itself mid-write")
        workdir = stack.data_dir / "jobs" / job_id
        assert list(workdir.glob(".checkpoint.safetensors.*.tmp")), "the torn temporary file is left behind"
        assert [m["epoch"] for m in epochs_of(client, job_id)] == [1, 2]
    finally:
        stack.start_worker()
    done = stack.wait_for_job(client, job_id, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert_each_epoch_once(client, job_id, 5)
    assert min(m["epoch"] for m in epochs_of(client, job_id) if m["attempt"] == 2) == 3  # epoch 3 was redone
    assert not list(workdir.glob(".*.tmp")), "stale temporaries are cleaned on resume"


def test_killed_during_final_evaluation_finishes_without_retraining(stack):
    client = stack.new_tenant()
    replace_worker(stack, PEERAID_FAULTS="final-evaluation:kill")
    try:
        job_id = submit(client, epochs=3, lr_decay_epochs=[2])
        wait_until(lambda: stack.worker.poll() is not None, 180, "the worker to die while evaluating")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "evaluating"
    finally:
        stack.start_worker()
    done = stack.wait_for_job(client, job_id, ("succeeded", "failed"))
    assert done["status"] == "succeeded" and done["attempts"] == 2, done["error"]
    assert all(m["attempt"] == 1 for m in epochs_of(client, job_id)), "no epoch retrained"
    assert_each_epoch_once(client, job_id, 3)


def test_workers_killed_at_random_moments(stack):
    rng = random.Random(20261125)
    client = stack.new_tenant()
    job_id = submit(client, epochs=10, lr_decay_epochs=[8])
    kills, attempts_seen = 0, 0

    def claimed_anew():  # wait for a worker to own the job again before killing it
        job = client.get(f"/v1/jobs/{job_id}").json()
        fresh = job["attempts"] > attempts_seen and job["status"] in ("running", "evaluating")
        return job if fresh or job["status"] == "succeeded" else None

    while kills < 3:
        job = wait_until(claimed_anew, 180, "a worker to claim the job")
        if job["status"] == "succeeded":
            break
        attempts_seen = job["attempts"]
        time.sleep(rng.uniform(0.5, 4.0))
        stack.kill_worker(signal.SIGKILL)
        kills += 1
        stack.start_worker()
    done = stack.wait_for_job(client, job_id, ("succeeded", "failed"), timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert kills <= done["attempts"] <= kills + 1, (done["attempts"], kills)
    assert_each_epoch_once(client, job_id, 10)


def test_the_api_restarting_leaves_running_jobs_alone(stack):
    client = stack.new_tenant()
    job_id = submit(client, epochs=8, lr_decay_epochs=[6])
    wait_until(lambda: len(epochs_of(client, job_id)) >= 1, 180, "a first epoch")
    stack.kill_api()
    time.sleep(2)
    stack.start_api()
    done = stack.wait_for_job(client, job_id, ("succeeded", "failed"))
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert_each_epoch_once(client, job_id, 8)


def test_divergence_fails_the_job_with_that_reason_keeping_finished_epochs(stack):
    """Weight decay × LR of 10 multiplies the weights by about −9 a step: overflow in the first epoch.
    With 3 (and no momentum) they overflow in the second epoch: the failed job keeps the first's students."""
    client = stack.new_tenant()
    at_once = submit(client, lr=10, momentum=0.99, weight_decay=1.0)
    later = submit(client, lr=10, momentum=0.0, weight_decay=0.3)
    for job_id in (at_once, later):
        done = stack.wait_for_job(client, job_id, ("succeeded", "failed"))
        assert done["status"] == "failed" and "non-finite" in done["error"] and "diverged" in done["error"], done
    assert client.get(f"/v1/jobs/{at_once}/artifacts").json() == []
    kept = {a["name"]: a for a in client.get(f"/v1/jobs/{later}/artifacts").json()}
    assert {"last_student", "student", "model_card"} <= set(kept), kept
    assert [m["epoch"] for m in epochs_of(client, later)] == [1]
    weights = client.get(kept["last_student"]["url"])
    assert hashlib.sha256(weights.content).hexdigest() == kept["last_student"]["sha256"]


def test_disk_full_while_writing_an_artifact_fails_cleanly(stack):
    client = stack.new_tenant()
    replace_worker(stack, PEERAID_FAULTS="write:student.safetensors:enospc")
    try:
        job_id = submit(client, epochs=2, lr_decay_epochs=[1])
        done = stack.wait_for_job(client, job_id, ("succeeded", "failed"))
    finally:
        replace_worker(stack)
    assert done["status"] == "failed" and "No space left on device" in done["error"], done
    artifacts_dir = stack.data_dir / "jobs" / job_id / "artifacts"
    assert not list(artifacts_dir.glob(".*.tmp")), "no half-written file is left to be served"
    for artifact in client.get(f"/v1/jobs/{job_id}/artifacts").json():  # what the failed job keeps is whole
        download = client.get(artifact["url"])
        assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"], artifact["name"]
    assert (stack.data_dir / "jobs" / job_id / "checkpoint.safetensors").exists(), "the training is kept"


@pytest.mark.parametrize("stack", ["postgres-redis"], indirect=True)
def test_redis_restarted_while_jobs_are_queued_and_running_loses_none(stack):
    if not shutil.which("redis-server") or "127.0.0.1:6379" not in stack.env["PEERAID_BROKER_URL"]:
        pytest.skip("needs a local redis-server to restart")
    client = stack.new_tenant()
    running = submit(client, epochs=6, lr_decay_epochs=[5])
    queued = submit(client, epochs=2, lr_decay_epochs=[1])
    wait_until(lambda: len(epochs_of(client, running)) >= 1, 180, "the first job to train")
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, capture_output=True)
    wait_until(lambda: subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True).returncode != 0, 20, "redis to stop")
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no"], check=True
    )
    wait_until(
        lambda: subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True).stdout.strip() == b"PONG", 20, "redis to start"
    )
    for job_id, epochs in ((running, 6), (queued, 2)):
        done = stack.wait_for_job(client, job_id, ("succeeded", "failed"), timeout=300)
        assert done["status"] == "succeeded", done["error"]
        assert_each_epoch_once(client, job_id, epochs)


def _pg_cluster() -> list[str] | None:
    """The local cluster's control command, if the tests' PostgreSQL is the local cluster (PEERAID_TEST_PG_URL)."""
    url = urlsplit(PG_ADMIN_URL)
    if url.hostname not in ("127.0.0.1", "localhost", "::1") or (url.port or 5432) != 5432:
        return None
    versions = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").exists() else []
    if not versions or not shutil.which("pg_ctlcluster"):
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main"]


@pytest.mark.parametrize("stack", ["postgres-redis"], indirect=True)
def test_postgres_restarted_during_a_running_job_loses_nothing(stack):
    cluster = _pg_cluster()
    if cluster is None:
        pytest.skip("needs the tests' PostgreSQL to be a local cluster it may restart (pg_ctlcluster, 127.0.0.1:5432)")
    client = stack.new_tenant()
    job_id = submit(client, epochs=6, lr_decay_epochs=[5])
    wait_until(lambda: len(epochs_of(client, job_id)) >= 1, 180, "a first epoch")
    subprocess.run([*cluster, "restart", "-m", "fast"], check=True, capture_output=True, timeout=120)
    done = stack.wait_for_job(client, job_id, ("succeeded", "failed"), timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert_each_epoch_once(client, job_id, 6)
    assert httpx.get(f"{stack.url}/readyz", timeout=10).json() == {"status": "ready"}
