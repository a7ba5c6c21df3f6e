"""Forward the engine's progress to the database: progress and ETA, per-epoch metrics, phases."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import update

from core.db.models import Job
from core.engine.spec import JobSpec
from core.engine.callbacks import EpochRecord, Stage, StepProgress, TrainingCallbacks

if TYPE_CHECKING:
    from .runner import JobRunner

log = logging.getLogger(__name__)


class DatabaseCallbacks(TrainingCallbacks):
    def __init__(self, runner: JobRunner, job: Job, spec: JobSpec):
        self.runner = runner
        self.job = job
        self.spec = spec
        self.history: list[EpochRecord] = []

    def _epoch_seconds(self, p: StepProgress) -> float:
        if self.history:
            last = self.history[-1]
            return last.train_seconds + last.eval_seconds
        return p.steps_per_epoch * self.spec.batch_size / max(p.images_per_sec, 1e-9)

    def on_step(self, p: StepProgress) -> None:
        done = p.epoch - 1 + p.step / p.steps_per_epoch
        epoch_seconds = self._epoch_seconds(p)
        progress = {
            "epoch": p.epoch, "epochs": p.epochs, "step": p.step, "steps_per_epoch": p.steps_per_epoch,
            "images_per_sec": round(p.images_per_sec, 1), "eta_seconds": round((p.epochs - done) * epoch_seconds, 1),
            "fraction": round(done / p.epochs, 4), "losses": p.losses,
        }
        try:
            self.runner.update_job(status="running", phase=f"training epoch {p.epoch}/{p.epochs}", progress=progress)
        except Exception:  # progress is best effort; the next write or the epoch record catches up
            log.exception("progress write for job %s failed", self.runner.job_id)

    def on_resume(self, history: list[EpochRecord]) -> None:
        self.history = list(history)
        records = [r.to_dict() for r in history]
        self.runner.db(lambda s: (self.runner.record_epochs(s, self.job, records, replace=False), s.commit()))
        log.info("job %s resumes after epoch %d", self.runner.job_id, len(history))

    def on_epoch(self, record: EpochRecord) -> None:
        self.history.append(record)
        latest = {"epoch": record.epoch, "lr": record.lr, "student": record.student, "swa_student": record.swa_student}
        best = record.best  # the engine's own model selection
        runner = self.runner
        runner.db(
            lambda s: (
                runner.record_epochs(s, self.job, [record.to_dict()]),
                s.execute(update(Job).where(Job.id == runner.job_id, Job.worker == runner.me).values(latest_metrics=latest, best_metrics=best)),
                s.commit(),
            )
        )

    def on_stage(self, stage: Stage, detail: str = "") -> None:
        values = {"phase": detail or stage.value}
        if stage == Stage.EVALUATING:
            values["status"] = "evaluating"
        self.runner.update_job(**values)

    def should_stop(self) -> bool:
        return self.runner.should_stop()
