"""A job's progress as users see it (GET /v1/jobs/{id}, the page, the CLI), written by the worker's callbacks
through its lease on a real database: the fraction and the ETA run through the training and then the
final evaluation, whose share of the job the pre-flight estimate gives (a small job spends most of its
time in AutoAttack: its bar must not sit at 100% meanwhile)."""

from __future__ import annotations

import pytest

from core.db import jobs
from core.db.models import Job
from core.db.session import database
from core.engine.callbacks import EpochRecord, EvaluationProgress, StepProgress
from core.engine.estimates import DataShape
from core.engine.preflight import preflight
from worker.callbacks import DatabaseCallbacks
from worker.lease import JobLease, JobLimits, is_stale

from .conftest import tiny_spec
from .test_reconciler import add_job, settings  # noqa: F401 (the fixture)


def progress(settings, job_id) -> dict:  # noqa: F811
    with database(settings.resolved_database_url).transaction() as session:
        return session.get_one(Job, job_id).progress


def test_the_fraction_and_eta_run_through_training_then_the_evaluation(settings):  # noqa: F811
    db = database(settings.resolved_database_url)
    job_id = add_job(settings, status="queued")
    job = db.run(lambda session: jobs.claim(session, job_id, "host:1", is_stale=lambda j, now: is_stale(j, settings, now)))
    lease = JobLease(db, jobs.Lease(job_id, "host:1", job.attempts), 60, JobLimits(deadline=float("inf"), max_memory_bytes=2**62))
    callbacks = DatabaseCallbacks(lease, batch_size=10, evaluation_share=0.8)  # the evaluation takes 4× the training

    callbacks.on_step(StepProgress(epoch=1, epochs=2, step=5, steps_per_epoch=10, images_per_sec=100.0, lr=0.1, losses={}))
    first = progress(settings, job_id)
    assert first["fraction"] == pytest.approx(0.25 * 0.2)
    assert first["eta_seconds"] == pytest.approx(1.5 * 1.0 + 4 * 2 * 1.0)  # 1.5 epochs of 1 s left, then 4 × 2 s of evaluation
    record = EpochRecord(epoch=2, lr=0.1, train_seconds=1.0, eval_seconds=0.0, images_per_sec=100.0, losses={}, student={})
    callbacks.history.append(record)
    callbacks.on_step(StepProgress(epoch=2, epochs=2, step=10, steps_per_epoch=10, images_per_sec=100.0, lr=0.1, losses={}))
    trained = progress(settings, job_id)
    assert trained["fraction"] == pytest.approx(0.2) and trained["eta_seconds"] == pytest.approx(8.0)

    start = EvaluationProgress(model="student", attack="clean, FGSM, PGD-20", batch=0, batches=4, fraction=0.0)
    callbacks.on_evaluation(start)
    evaluating = progress(settings, job_id)
    assert evaluating["fraction"] == pytest.approx(0.2) and evaluating["eta_seconds"] == pytest.approx(8.0)  # no pace yet
    assert evaluating["images_per_sec"] is None and evaluating["evaluation"]["attack"] == "clean, FGSM, PGD-20"

    callbacks.on_evaluation(
        EvaluationProgress(
            model="student",
            attack="AutoAttack",
            batch=1,
            batches=2,
            accuracy_so_far=0.4,
            eta_seconds=30.0,
            fraction=0.5,
            images_per_sec=3.0,
        )
    )
    halfway = progress(settings, job_id)
    assert halfway["fraction"] == pytest.approx(0.2 + 0.8 * 0.5) and halfway["eta_seconds"] == 30.0
    assert halfway["images_per_sec"] == 3.0 and halfway["epoch"] == 2  # the training's place is kept beside it


def test_the_estimate_gives_a_small_jobs_evaluation_most_of_its_time():
    spec = tiny_spec(evaluation=dict(n_examples=None, autoattack=True, autoattack_n_examples=100, batch_size=100))
    estimate = preflight(spec, DataShape(1, 16, 16, 10, num_train=320, num_test=200))
    assert 0.5 < estimate.evaluation_share("cpu") < 1 and estimate.evaluation_hours["cpu"] < estimate.hours["cpu"]
    no_autoattack = preflight(tiny_spec(), DataShape(1, 16, 16, 10, num_train=320, num_test=200))
    assert no_autoattack.evaluation_share("cpu") < estimate.evaluation_share("cpu")
