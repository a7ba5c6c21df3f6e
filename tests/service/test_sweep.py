"""The sweep of files no row points at never removes an upload still in progress, however slowly its
bytes arrive (a real API process receiving a trickle, swept with the shortest thresholds), and still
removes what an interrupted upload or a deleted job left behind."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.db.session import database
from core.storage import UPLOADS_IN_PROGRESS, Storage
from core.sweep import sweep_orphans
from tests.stack import Stack, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("embedded")]

NOTHING = {"partial_uploads": 0, "unrecorded_uploads": 0, "deleted_jobs_files": 0}


def tiny_npz() -> bytes:
    """A valid dataset of under 8 KiB: less than one write buffer."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        x_train=rng.integers(0, 255, (24, 8, 8, 1), dtype=np.uint8),
        y_train=np.arange(24) % 2,
        x_test=rng.integers(0, 255, (8, 8, 8, 1), dtype=np.uint8),
        y_test=np.arange(8) % 2,
    )
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    stack = Stack("sweep", {}, tmp_path_factory.mktemp("sweep"))
    try:
        stack.admin("migrate")
        stack.start_api()
        yield stack
    finally:
        stack.stop()


def sweep(stack: Stack, older_than: float | None) -> dict[str, int]:
    """With `older_than`, every threshold that; else the API's own (partials after 10 min, the rest after an hour)."""
    db = database(f"sqlite:///{(stack.data_dir / 'peeraid.sqlite').resolve()}")
    thresholds = {} if older_than is None else {"partial_after": older_than, "orphan_after": older_than}
    return sweep_orphans(db, Storage(stack.data_dir), **thresholds)


def test_an_upload_trickling_in_is_never_swept(api):
    body = tiny_npz()
    assert len(body) < 8192
    client = api.new_tenant()
    answer: list[httpx.Response] = []

    def trickle():
        for start in range(0, len(body), 64):
            yield body[start : start + 64]
            time.sleep(0.05)  # 46 chunks in about 2.5 s: bytes keep coming, the file's mtime does not move

    upload = threading.Thread(
        target=lambda: answer.append(client.post("/v1/datasets", params={"name": "trickled", "filename": "t.npz"}, content=trickle()))
    )
    upload.start()
    wait_until(lambda: list(api.data_dir.glob("datasets/*/*/*.partial")), 30, "the upload's partial file")
    sweeps = []
    while upload.is_alive():
        time.sleep(0.3)
        sweeps.append(sweep(api, older_than=0.2))  # the shortest thresholds: anything not in progress would go
    upload.join()
    assert answer[0].status_code == 201, answer[0].text
    assert all(removed == NOTHING for removed in sweeps), sweeps
    dataset = answer[0].json()
    stored = list(api.data_dir.glob(f"datasets/*/{dataset['id']}/*"))
    assert [p.read_bytes() for p in stored] == [body], stored
    assert not list((api.data_dir / UPLOADS_IN_PROGRESS).iterdir()), "the lease ends with the upload"
    assert sweep(api, older_than=0) == NOTHING, "a recorded dataset is never swept"
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 200


def test_what_an_interrupted_upload_or_a_deleted_job_left_is_swept(api):
    def leftover(relative: str, age: float) -> Path:
        path = api.data_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    dead_upload = leftover("datasets/tn_dead/ds_dead/data.upload.partial", 7200)  # the whole folder goes
    recent_partial = leftover("datasets/tn_dead/ds_recent/data.upload.partial", 700)  # the partial goes, its folder stays a while
    unrecorded = leftover("datasets/tn_dead/ds_unrecorded/data.upload", 7200)
    deleted_job = leftover("jobs/job_deleted/checkpoint.safetensors", 7200)
    stopped = leftover("datasets/tn_dead/ds_stopped/data.upload.partial", 7200)
    stale_lease = leftover(f"{UPLOADS_IN_PROGRESS}/ds_stopped", 600)  # its API process stopped refreshing it
    assert sweep(api, older_than=None) == {"partial_uploads": 1, "unrecorded_uploads": 3, "deleted_jobs_files": 1}
    for path in (dead_upload.parent, recent_partial, unrecorded.parent, deleted_job.parent, stopped.parent, stale_lease):
        assert not path.exists(), path
    assert recent_partial.parent.exists()
