"""Event streams hold no database connection, are limited per tenant (429), share one watcher, and
end when the job finishes or the key is revoked."""

from __future__ import annotations

import json
import threading

import pytest

from api.main import create_app
from core.db import tenants
from core.db.session import database
from tests.stack import FAST_JOB

from .conftest import TestClient, create_key

QUEUED = {"preset": "digits-demo", "spec": FAST_JOB}


def read_events(lines, until: str = "end", limit: int = 20) -> list[tuple[str, dict]]:
    """Events from a stream's line iterator (one per response: a stream can be iterated once)."""
    events, kind = [], None
    for line in lines:
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((kind, json.loads(line.split(":", 1)[1])))
            if kind in (until, "error", "deleted") or len(events) >= limit:
                break
    return events


def test_a_finished_job_streams_its_state_then_ends(finished):
    owner, _, job = finished
    with owner.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response.iter_lines())
    assert [kind for kind, _ in events] == ["job", "end"] and events[1][1] == {"status": "succeeded"}


@pytest.fixture(scope="module")
def small_limits(settings):
    app = create_app(settings.model_copy(update={"tenant_max_streams": 2}))
    key = create_key(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, key


def test_streams_per_tenant_are_limited_and_slots_come_back(small_limits):
    client, _ = small_limits
    job = client.post("/v1/jobs", json=QUEUED).json()
    url = f"/v1/jobs/{job['id']}/events"
    first, second = client.stream("GET", url), client.stream("GET", url)
    with first as one, second as two:
        assert one.status_code == two.status_code == 200
        one_lines, two_lines = one.iter_lines(), two.iter_lines()
        assert read_events(one_lines, until="job")[0][1]["status"] == "queued"
        refused = client.get(url)
        assert refused.status_code == 429 and "limit 2 per tenant" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "10"
        client.post(f"/v1/jobs/{job['id']}/cancel")  # both streams see the end and close
        assert read_events(one_lines)[-1] == ("end", {"status": "cancelled"})
        assert read_events(two_lines)[-1] == ("end", {"status": "cancelled"})
    with client.stream("GET", url) as again:  # the slots were given back
        assert again.status_code == 200


def test_a_stream_ends_when_its_key_is_revoked(small_limits, settings):
    client, key = small_limits
    job = client.post("/v1/jobs", json=QUEUED).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        lines = response.iter_lines()
        assert read_events(lines, until="job")[0][0] == "job"
        threading.Timer(0.2, lambda: _revoke(settings, key)).start()
        events = read_events(lines)
    assert events[-1] == ("error", {"detail": "the API key was revoked"})


def _revoke(settings, key: str) -> None:
    with database(settings.resolved_database_url).transaction() as session:
        tenants.revoke_key(session, tenants.key_prefix(key))


def test_evaluation_progress_reaches_the_api(new_client, settings):
    """The evaluation's progress the worker writes (model, attack, batch i/n, accuracy so far, ETA) is in the job."""
    from sqlalchemy import update

    from core.db.models import Job

    client = new_client()
    job = client.post("/v1/jobs", json=QUEUED).json()
    evaluation = {
        "model": "student",
        "attack": "AutoAttack",
        "batch": 2,
        "batches": 5,
        "accuracy_so_far": 0.4,
        "eta_seconds": 12.0,
        "fraction": 0.45,
        "images_per_sec": 3.5,
    }
    with database(settings.resolved_database_url).transaction() as session:
        session.execute(
            update(Job).where(Job.id == job["id"]).values(progress={"epoch": 4, "epochs": 4, "fraction": 0.56, "evaluation": evaluation})
        )
    assert client.get(f"/v1/jobs/{job['id']}").json()["progress"]["evaluation"] == evaluation
    client.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_stream_on_an_unchanged_job_sends_a_keep_alive_every_interval(settings):
    """The watcher re-delivers an unchanged job every round; that must not put off the keep-alive, or a
    stream on a queued job stays silent until a proxy (or the SDK's read timeout) cuts it."""
    from api.streams import JobWatcher

    app = create_app(settings.model_copy(update={"sse_keep_alive_seconds": 0.3}))
    app.state.job_watcher = JobWatcher(app.state.database, interval=0.05)  # news far more often than the keep-alive
    with TestClient(app, headers={"Authorization": f"Bearer {create_key(settings)}"}) as client:
        job = client.post("/v1/jobs", json=QUEUED).json()
        threading.Timer(2.0, lambda: client.post(f"/v1/jobs/{job['id']}/cancel")).start()
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            lines = list(response.iter_lines())  # until the cancel ends the stream
    assert lines.count(": keep-alive") >= 4, lines
    assert [line for line in lines if line.startswith("event:")] == ["event: job", "event: job", "event: end"], lines
