"""The engine's events, written to the job's row through its lease: progress and ETA, per-epoch
metrics, the stage (the job's status follows it), evaluation progress, and the stop check."""

from __future__ import annotations

import dataclasses
import logging

from core.db import jobs
from core.db.models import JobStatus
from core.engine.callbacks import EpochRecord, EvaluationProgress, Stage, StepProgress, TrainingCallbacks

from .lease import JobLease

log = logging.getLogger(__name__)


class DatabaseCallbacks(TrainingCallbacks):
    def __init__(self, lease: JobLease, batch_size: int):
        self.lease = lease
        self.batch_size = batch_size
        self.history: list[EpochRecord] = []
        self.training: dict = {}  # the last training progress, kept beside the evaluation's

    def _epoch_seconds(self, p: StepProgress) -> float:
        if self.history:
            last = self.history[-1]
            return last.train_seconds + last.eval_seconds
        return p.steps_per_epoch * self.batch_size / max(p.images_per_sec, 1e-9)

    def on_step(self, p: StepProgress) -> None:
        done = p.epoch - 1 + p.step / p.steps_per_epoch
        progress = {
            "epoch": p.epoch,
            "epochs": p.epochs,
            "step": p.step,
            "steps_per_epoch": p.steps_per_epoch,
            "images_per_sec": round(p.images_per_sec, 1),
            "eta_seconds": round((p.epochs - done) * self._epoch_seconds(p), 1),
            "fraction": round(done / p.epochs, 4),
            "losses": p.losses,
        }
        self.training = progress
        self._best_effort(progress, f"training epoch {p.epoch}/{p.epochs}")

    def on_evaluation(self, p: EvaluationProgress) -> None:
        self._best_effort(
            {**self.training, "evaluation": dataclasses.asdict(p)}, f"evaluating {p.model}: {p.attack} (batch {p.batch}/{p.batches})"
        )

    def _best_effort(self, progress: dict, phase: str) -> None:
        try:
            self.lease.write(jobs.report_progress, progress, phase)
        except Exception:  # progress is best effort; the next write or the epoch record catches up
            log.exception("progress write for job %s failed", self.lease.job_id)

    def on_resume(self, history: list[EpochRecord]) -> None:
        self.history = list(history)
        self.lease.write(jobs.record_epochs, self.lease.attempt, [r.to_dict() for r in history], replace=False)
        log.info("job %s resumes after epoch %d", self.lease.job_id, len(history))

    def on_epoch(self, record: EpochRecord) -> None:
        self.history.append(record)
        latest = {"epoch": record.epoch, "lr": record.lr, "student": record.student, "swa_student": record.swa_student}
        self.lease.write(jobs.record_epochs, self.lease.attempt, [record.to_dict()], latest=latest, best=record.best)

    def on_stage(self, stage: Stage, detail: str = "") -> None:
        status = JobStatus.EVALUATING if stage == Stage.EVALUATING else JobStatus.RUNNING
        self.lease.write(jobs.report_stage, status, detail or stage.value)

    def should_stop(self) -> bool:
        return self.lease.should_stop()
