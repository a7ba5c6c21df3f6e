"""The SDK's event streams against a real API process with no worker (jobs stay queued): a quiet stream
lives on the service's keep-alives past the read timeout, and a stream the service drops (the API killed
and started again) is resumed where it was, without the states already delivered."""

from __future__ import annotations

import threading
import time

import pytest

from peeraid_client import Client
from tests.stack import FAST_JOB, Stack, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("embedded")]

KEEP_ALIVE = 0.5


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    stack = Stack("sse", {"PEERAID_SSE_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE)}, tmp_path_factory.mktemp("sse"))
    try:
        stack.admin("migrate")
        stack.start_api()
        yield stack, stack.admin("create-key", "streams")
    finally:
        stack.stop()


def follow(client: Client, job_id: str, into: list, errors: list) -> threading.Thread:
    def run():
        try:
            for event in client.events(job_id):
                into.append(event)
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_quiet_stream_outlives_the_read_timeout_on_keep_alives(api):
    stack, key = api
    with Client(stack.url, key, stream_read_timeout=4 * KEEP_ALIVE, retries=0) as client:
        job = client.submit_job(preset="digits-demo", spec=FAST_JOB)
        events: list = []
        errors: list = []
        thread = follow(client, job["id"], events, errors)
        time.sleep(8 * KEEP_ALIVE)  # twice the read timeout, with nothing new to say
        assert not errors and [kind for kind, _ in events] == ["job"], (errors, events)
        client.cancel_job(job["id"])
        thread.join(30)
    assert [kind for kind, _ in events] == ["job", "job", "end"] and not errors, (errors, events)


def test_a_dropped_stream_is_resumed_without_repeating_itself(api):
    stack, key = api
    with Client(stack.url, key, retries=8, backoff=0.25) as client:
        job = client.submit_job(preset="digits-demo", spec=FAST_JOB)
        events: list = []
        errors: list = []
        thread = follow(client, job["id"], events, errors)
        wait_until(lambda: events, 30, "the first event")
        stack.kill_api()  # the stream breaks mid-way
        stack.start_api()
        client.cancel_job(job["id"])
        thread.join(60)
    assert not errors, errors
    assert [(kind, data.get("status")) for kind, data in events] == [("job", "queued"), ("job", "cancelled"), ("end", "cancelled")], events
