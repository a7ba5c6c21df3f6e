"""Limits and references hold under parallel clients on PostgreSQL (row locks, not check-then-act), no
request holds a database connection while it waits, and hostile bytes get a 4xx, never a 500."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.stack import FAST_JOB, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("stack", ["postgres-redis"], indirect=True)]

LONG = {"preset": "digits-demo", "spec": {**FAST_JOB, "epochs": 60, "lr_decay_epochs": [50]}}


def together(n: int, call) -> list:
    """Run call(i) in n threads released at the same instant."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_twenty_parallel_submissions_admit_exactly_the_limit(stack):
    tenant = f"racer-{secrets.token_hex(3)}"
    stack.admin("set-limits", tenant, "--max-concurrent-jobs", "2")
    key = stack.admin("create-key", tenant)
    clients = [stack.client(key) for _ in range(20)]
    codes = together(20, lambda i: clients[i].post("/v1/jobs", json=LONG).status_code)
    assert sorted(codes) == [201] * 2 + [429] * 18, codes
    active = clients[0].get("/v1/jobs").json()["items"]
    assert len(active) == 2
    for job in active:
        clients[0].post(f"/v1/jobs/{job['id']}/cancel")


def test_deleting_a_dataset_while_a_job_is_submitted_on_it_never_lets_both_win(stack, digits_npz_bytes):
    client = stack.new_tenant()
    outcomes = set()
    for _ in range(6):
        dataset = client.post("/v1/datasets", params={"name": "contested"}, content=digits_npz_bytes).json()
        delete, submit = together(
            2,
            lambda i, dataset_id=dataset["id"]: (
                client.delete(f"/v1/datasets/{dataset_id}") if i == 0 else client.post("/v1/jobs", json={**LONG, "dataset": dataset_id})
            ),
        )
        outcomes.add((delete.status_code, submit.status_code))
        assert (delete.status_code, submit.status_code) in {(204, 422), (409, 201)}, (delete.text, submit.text)
        if submit.status_code == 201:
            job = submit.json()
            assert job["dataset_id"] == dataset["id"]
            client.post(f"/v1/jobs/{job['id']}/cancel")
            stack.wait_for_job(client, job["id"], "cancelled", timeout=60)
            assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    print(f"\n(delete, submit) outcomes seen: {sorted(outcomes)}")


def test_nul_bytes_reach_postgresql_nowhere(stack, digits_npz_bytes):
    client = stack.new_tenant()
    assert client.post("/v1/datasets", params={"name": "a\x00b"}, content=digits_npz_bytes).status_code == 422
    assert client.get("/v1/jobs/job_%00").status_code == 422
    assert client.get("/v1/datasets/ds_%00").status_code == 422
    for body in ({"preset": "digits-demo", "dataset": "ds_\x00"}, {"preset": "digits-demo", "spec": {"dataset": "ds_\x00"}}):
        assert client.post("/v1/jobs", json=body).status_code == 422
    assert client.get("/healthz").status_code == 200


def _connections_in_transaction(stack) -> int:
    engine = create_engine(stack.env["PEERAID_DATABASE_URL"])
    database = stack.env["PEERAID_DATABASE_URL"].rsplit("/", 1)[1]
    with engine.connect() as connection:
        count = connection.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND state LIKE 'idle in transaction%'"), {"db": database}
        ).scalar_one()
    engine.dispose()
    return count


def test_open_streams_and_slow_uploads_hold_no_connection_and_do_not_starve_others(stack):
    hostile = stack.new_tenant()
    job = hostile.post("/v1/jobs", json=LONG).json()
    streams, stop = [], threading.Event()

    def slow_upload():
        def trickle():
            while not stop.is_set():
                yield b"x" * 64
                time.sleep(0.5)

        with contextlib.suppress(httpx.HTTPError):
            hostile.post("/v1/datasets", params={"name": "slow"}, content=trickle(), timeout=120)

    uploads = [threading.Thread(target=slow_upload, daemon=True) for _ in range(2)]
    try:
        for _ in range(10):
            stream = hostile.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60)
            assert stream.__enter__().status_code == 200
            streams.append(stream)
        refused = hostile.get(f"/v1/jobs/{job['id']}/events")
        assert refused.status_code == 429  # the tenant's stream limit
        for upload in uploads:
            upload.start()
        time.sleep(2)

        other = stack.new_tenant()
        mine = other.post("/v1/jobs", json=LONG).json()
        latencies = []
        for _ in range(50):
            started = time.perf_counter()
            assert other.get(f"/v1/jobs/{mine['id']}").status_code == 200
            latencies.append(time.perf_counter() - started)
        held = _connections_in_transaction(stack)
        print(
            f"\nanother tenant's GET job beside 10 streams and 2 trickling uploads: max {max(latencies) * 1000:.0f} ms; "
            f"connections idle in a transaction: {held}"
        )
        assert held == 0
        other.post(f"/v1/jobs/{mine['id']}/cancel")
    finally:
        stop.set()
        for stream in streams:
            stream.__exit__(None, None, None)
        hostile.post(f"/v1/jobs/{job['id']}/cancel")
    wait_until(lambda: _connections_in_transaction(stack) == 0, 10, "no connection left in a transaction")


def _finished_job(stack, client) -> str:
    job = client.post("/v1/jobs", json=LONG).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    stack.wait_for_job(client, job["id"], "cancelled", timeout=60)
    return job["id"]


def test_cancelling_or_deleting_a_job_another_request_deletes_answers_404_or_409_never_500(stack):
    client = stack.new_tenant()
    outcomes, wrong = Counter(), []
    for i in range(20):
        job_id = _finished_job(stack, client)
        second = "cancel" if i % 2 == 0 else "delete"  # the other request: a cancel, or a second delete
        delete, other = together(
            2,
            lambda n, job_id=job_id, second=second: (
                client.delete(f"/v1/jobs/{job_id}") if n == 0 or second == "delete" else client.post(f"/v1/jobs/{job_id}/cancel")
            ),
        )
        outcomes[(second, delete.status_code, other.status_code)] += 1
        loser = other if delete.status_code == 204 else delete
        if sorted([delete.status_code, other.status_code]) not in ([204, 404], [204, 409]) or job_id not in loser.text:
            wrong.append((second, delete.status_code, other.status_code, loser.text[:200]))  # the loser names the job
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    print(f"\n(second request, delete, second) outcomes seen: {dict(outcomes)}")
    assert not wrong, wrong


def test_deleting_a_dataset_twice_at_once_answers_204_and_404_never_500(stack, digits_npz_bytes):
    client = stack.new_tenant()
    for i in range(6):
        dataset = client.post("/v1/datasets", params={"name": f"twice-{i}"}, content=digits_npz_bytes).json()
        codes = sorted(r.status_code for r in together(2, lambda _, dataset_id=dataset["id"]: client.delete(f"/v1/datasets/{dataset_id}")))
        assert codes == [204, 404], codes


def test_two_uploads_of_one_name_at_once_record_one(stack, digits_npz_bytes):
    client = stack.new_tenant()
    for i in range(4):
        answers = together(2, lambda _, i=i: client.post("/v1/datasets", params={"name": f"same-{i}"}, content=digits_npz_bytes))
        codes = sorted(a.status_code for a in answers)
        assert codes == [201, 409], [a.text for a in answers]
        winner = next(a.json() for a in answers if a.status_code == 201)
        assert winner["id"] in next(a.json()["detail"] for a in answers if a.status_code == 409)
    names = [d["name"] for d in client.get("/v1/datasets").json()["items"] if not d["builtin"]]
    assert sorted(names) == [f"same-{i}" for i in range(4)]
