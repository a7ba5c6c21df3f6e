"""The database is the source of truth: claims, and the reconciler's bounded recovery, on a real
SQLite database and kombu's SQLite broker (no servers, no mocks)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from core.db import jobs
from core.db.models import Base, Job, Tenant, utcnow
from core.db.session import database
from core.settings import Settings
from worker.lease import is_stale, owner_is_dead, worker_name
from worker.queue import JobQueue
from worker.reconciler import reconcile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(tmp_path):
    settings = Settings(data_dir=tmp_path, heartbeat_timeout=30, requeue_after=60, max_attempts=3)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    Base.metadata.create_all(database(settings.resolved_database_url).engine)
    with database(settings.resolved_database_url).transaction() as session:
        session.add(Tenant(id="tn_test", name="test"))
    return settings


def add_job(settings, **values) -> str:
    with database(settings.resolved_database_url).transaction() as session:
        job = Job(tenant_id="tn_test", dataset_name="digits", spec={}, max_attempts=settings.max_attempts, **values)
        session.add(job)
        session.flush()
        return job.id


def job(settings, job_id) -> Job:
    with database(settings.resolved_database_url).transaction() as session:
        return session.get(Job, job_id)


def claim(session, job_id, settings, worker):
    return jobs.claim(session, job_id, worker, is_stale=lambda job, now: is_stale(job, settings, now))


def queued_messages(settings) -> int:
    engine = create_engine(f"sqlite:///{settings.data_dir / 'broker.sqlite'}")
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM kombu_message WHERE visible")).scalar()
    engine.dispose()
    return count


def ago(seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)


def test_a_silent_worker_gives_its_job_back_until_attempts_run_out(settings):
    retry = add_job(settings, status="running", attempts=1, worker="elsewhere:1", heartbeat_at=ago(120), enqueued_at=ago(600))
    exhausted = add_job(settings, status="running", attempts=3, worker="elsewhere:2", heartbeat_at=ago(120))
    alive = add_job(settings, status="running", attempts=1, worker="elsewhere:3", heartbeat_at=ago(1))
    counts = reconcile(settings, JobQueue.for_settings(settings))
    assert counts == {"requeued_lost_workers": 1, "failed_lost_workers": 1, "resent_messages": 1}
    requeued = job(settings, retry)
    assert requeued.status == "queued" and requeued.enqueued_at is not None
    assert requeued.worker is None and requeued.heartbeat_at is None  # a queued job has no owner
    failed = job(settings, exhausted)
    assert failed.status == "failed" and "gave up after 3 attempts" in failed.error and failed.finished_at
    assert job(settings, alive).status == "running"
    assert queued_messages(settings) == 1


def test_lost_messages_are_sent_again_but_fresh_ones_are_left_alone(settings):
    never_sent = add_job(settings, status="queued")
    lost = add_job(settings, status="queued", enqueued_at=ago(3600))
    fresh = add_job(settings, status="queued", enqueued_at=ago(5))
    assert reconcile(settings, JobQueue.for_settings(settings))["resent_messages"] == 2
    assert queued_messages(settings) == 2
    assert job(settings, fresh).enqueued_at < ago(4)
    assert job(settings, never_sent).enqueued_at > ago(5) and job(settings, lost).enqueued_at > ago(5)
    assert reconcile(settings, JobQueue.for_settings(settings))["resent_messages"] == 0  # nothing is due again yet


def test_a_cancel_requested_on_a_lost_job_finishes_it_as_cancelled(settings):
    job_id = add_job(settings, status="running", attempts=1, worker="elsewhere:1", heartbeat_at=ago(120), cancel_requested=True)
    reconcile(settings, JobQueue.for_settings(settings))
    assert job(settings, job_id).status == "cancelled"


def test_only_one_claim_wins(settings):
    job_id = add_job(settings, status="queued")
    with database(settings.resolved_database_url).transaction() as session:
        first = claim(session, job_id, settings, "host-a:1")
    with database(settings.resolved_database_url).transaction() as session:
        second = claim(session, job_id, settings, "host-b:2")
    assert first is not None and first.attempts == 1 and second is None
    assert job(settings, job_id).worker == "host-a:1"


def test_a_job_whose_process_died_on_this_host_is_claimable_at_once(settings):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = worker_name()
    host = me.rpartition(":")[0]
    job_id = add_job(settings, status="running", attempts=1, worker=f"{host}:{dead.pid}", heartbeat_at=utcnow())
    assert owner_is_dead(f"{host}:{dead.pid}") and not owner_is_dead(me)
    with database(settings.resolved_database_url).transaction() as session:
        claimed = claim(session, job_id, settings, me)
    assert claimed is not None and claimed.attempts == 2


def test_claiming_past_max_attempts_fails_the_job(settings):
    job_id = add_job(settings, status="queued", attempts=3)
    with database(settings.resolved_database_url).transaction() as session:
        assert claim(session, job_id, settings, worker_name()) is None
    assert job(settings, job_id).status == "failed" and "gave up after 3 attempts" in job(settings, job_id).error


def test_a_dropped_duplicate_message_costs_one_transaction_not_an_engine_start(settings):
    """A worker given a message for a job it cannot claim drops it before the engine (torch) loads: the
    livelock's copies each cost a worker 1.5–2.6 s of importing torch."""
    finished = add_job(settings, status="succeeded", attempts=1, worker="elsewhere:1")
    script = (
        "import sys, time\n"
        "from worker.tasks import run_job_task\n"
        "started = time.perf_counter()\n"
        f"outcomes = [run_job_task.run({finished!r}), run_job_task.run('job_00000000000000000000')]\n"
        "print(outcomes, 'torch' in sys.modules, time.perf_counter() - started)\n"
    )
    env = {**os.environ, "PEERAID_DATA_DIR": str(settings.data_dir)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    outcomes, torch_loaded, seconds = out.stdout.rsplit(" ", 2)
    assert outcomes == "['skipped', 'skipped']" and torch_loaded == "False", out.stdout
    print(f"\ntwo dropped messages: {float(seconds) * 1000:.0f} ms in all, torch not loaded")


def test_a_process_that_ran_a_job_is_recycled_and_one_that_dropped_messages_is_not():
    """worker_max_memory_per_child must separate the two: above it once the engine is loaded (a job's process is
    replaced after the job), below it with only the worker's own modules (a dropped message leaves it)."""
    from worker.celery_app import RECYCLE_ABOVE_KIB

    # as a pool process is made: forked from the worker's main process (peak memory is inherited through exec,
    # not through fork, which starts from the parent's resident memory)
    script = (
        "import os, resource\n"
        "import worker.tasks, worker.signals\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "if os.fork() == 0:\n"
        "    before = peak()\n"
        "    import worker.runner\n"
        "    print(before, peak(), flush=True)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    without_engine, with_engine = (int(kib) for kib in out.stdout.split())
    assert without_engine < RECYCLE_ABOVE_KIB / 2 and with_engine > RECYCLE_ABOVE_KIB * 1.5, (without_engine, with_engine)


def test_the_task_keeps_the_name_queued_messages_carry():
    """Messages already queued name the task "peeraid.run_job": renaming the Python function must not rename it."""
    from worker.celery_app import RUN_JOB_TASK
    from worker.tasks import run_job_task

    assert run_job_task.name == RUN_JOB_TASK == "peeraid.run_job"
