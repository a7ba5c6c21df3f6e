"""The engine's events, written to the job's row through its lease: progress and ETA, per-epoch
metrics, the stage (the job's status follows it), evaluation progress, and the stop check."""

from __future__ import annotations

import logging

from core.db import jobs
from core.db.models import JobStatus
from core.engine.callbacks import EpochRecord, EvaluationProgress, JobProgress, Stage, StepProgress, TrainingCallbacks

from .lease import JobLease

log = logging.getLogger(__name__)


class DatabaseCallbacks(TrainingCallbacks):
    """`evaluation_share`: the part of the job's time the final evaluation is expected to take (the pre-flight
    estimate's), so that the job's fraction and ETA run through the training and then the evaluation."""

    def __init__(self, lease: JobLease, batch_size: int, evaluation_share: float = 0.0):
        self.lease = lease
        self.batch_size = batch_size
        self.evaluation_share = min(max(evaluation_share, 0.0), 0.99)
        self.history: list[EpochRecord] = []
        self.training = JobProgress()  # the last training progress, kept beside the evaluation's
        self.expected_evaluation_seconds: float | None = None

    def _epoch_seconds(self, p: StepProgress) -> float:
        if self.history:
            last = self.history[-1]
            return last.train_seconds + last.eval_seconds
        return p.steps_per_epoch * self.batch_size / max(p.images_per_sec, 1e-9)

    def on_step(self, p: StepProgress) -> None:
        done = p.epoch - 1 + p.step / p.steps_per_epoch
        epoch_seconds = self._epoch_seconds(p)
        # the evaluation's time, scaled from the training's as measured by the estimate's ratio of the two
        share = self.evaluation_share
        # unknown (no estimate's share) is not "no time": leave the evaluation's ETA to its own pace
        self.expected_evaluation_seconds = p.epochs * epoch_seconds * share / (1 - share) if share > 0 else None
        progress = JobProgress(
            epoch=p.epoch,
            epochs=p.epochs,
            step=p.step,
            steps_per_epoch=p.steps_per_epoch,
            images_per_sec=round(p.images_per_sec, 1),
            eta_seconds=round((p.epochs - done) * epoch_seconds + (self.expected_evaluation_seconds or 0.0), 1),
            fraction=round(done / p.epochs * (1 - share), 4),
            losses=p.losses,
        )
        self.training = progress
        self._best_effort(progress, f"training epoch {p.epoch}/{p.epochs}")

    def on_evaluation(self, p: EvaluationProgress) -> None:
        eta = p.eta_seconds
        if eta is None and self.expected_evaluation_seconds is not None:  # no pace measured yet: the training's
            eta = self.expected_evaluation_seconds * (1 - p.fraction)
        progress = self.training.model_copy(
            update=dict(
                fraction=round(1 - self.evaluation_share + self.evaluation_share * p.fraction, 4),
                eta_seconds=None if eta is None else round(eta, 1),
                images_per_sec=None if p.images_per_sec is None else round(p.images_per_sec, 1),
                evaluation=p,
            )
        )
        self._best_effort(progress, f"evaluating {p.model}: {p.attack} (batch {p.batch}/{p.batches})")

    def _best_effort(self, progress: JobProgress, phase: str) -> None:
        try:
            self.lease.write(jobs.report_progress, progress.to_dict(), phase)
        except Exception:  # progress is best effort; the next write or the epoch record catches up
            log.exception("progress write for job %s failed", self.lease.job_id)

    def on_resume(self, history: list[EpochRecord]) -> None:
        self.history = list(history)
        self.lease.write(jobs.record_epochs, [r.to_dict() for r in history], replace=False)
        log.info("job %s resumes after epoch %d", self.lease.job_id, len(history))

    def on_epoch(self, record: EpochRecord) -> None:
        self.history.append(record)
        latest = {"epoch": record.epoch, "lr": record.lr, "student": record.student, "swa_student": record.swa_student}
        self.lease.write(jobs.record_epochs, [record.to_dict()], latest=latest, best=record.best)

    def on_stage(self, stage: Stage, detail: str = "") -> None:
        status = JobStatus.EVALUATING if stage == Stage.EVALUATING else JobStatus.RUNNING
        self.lease.write(jobs.report_stage, status, detail or stage.value)

    def should_stop(self) -> bool:
        return self.lease.should_stop()
