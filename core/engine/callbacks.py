"""What the engine tells its caller while a job runs: typed events, and the callbacks that receive them.

The worker (database), the command line (progress bars) and the tests implement `TrainingCallbacks`;
the engine calls them from the training thread. Epochs in events are numbered from 1 (the first epoch
is epoch 1), as users count them; `lr_decay_epochs` and `swa_start` in the spec count completed epochs,
so "decay at 214" means epochs 1–214 run at the initial rate and epoch 215 at the decayed one.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field


class Stage(enum.StrEnum):
    """Where a job is; the service derives a job's status from it (evaluating ⇔ EVALUATING)."""

    TRAINING = "training"
    EXPORTING = "exporting"
    EVALUATING = "evaluating"


@dataclass
class StepProgress:
    epoch: int  # 1-based
    epochs: int
    step: int  # steps done in this epoch, 1-based
    steps_per_epoch: int
    images_per_sec: float
    lr: float
    losses: dict[str, float]


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    lr: float
    train_seconds: float
    eval_seconds: float
    images_per_sec: float
    losses: dict[str, float]
    student: dict[str, float]
    swa_student: dict[str, float] | None = None
    best: dict[str, dict[str, float]] | None = None  # the selected models so far: {"student": {"epoch", ...metrics}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EvaluationProgress(BaseModel):
    """The final report's progress: which model and attack, how far, and the robust accuracy so far; the
    fraction of the whole final evaluation done (every model and attack, by planned work) and its ETA."""

    model: Annotated[str, Field(description="student or swa_student")]
    attack: Annotated[str, Field(description="e.g. 'clean, FGSM, PGD-20' or 'AutoAttack'")]
    batch: Annotated[int, Field(description="batches done, from 1")]
    batches: int
    accuracy_so_far: float | None = None
    eta_seconds: Annotated[float | None, Field(description="of the whole final evaluation (every model and attack)")] = None
    fraction: Annotated[float, Field(description="of the whole final evaluation done, by planned work")] = 0.0
    images_per_sec: Annotated[float | None, Field(description="of this model's attack so far")] = None


class JobProgress(BaseModel):
    """A job's progress as the service reports it (a job's `progress`): the training's last step, then the final
    evaluation's, with the fraction and the ETA of the whole job. All empty until the first step."""

    epoch: Annotated[int | None, Field(description="the epoch under way, from 1")] = None
    epochs: int | None = None
    step: int | None = None
    steps_per_epoch: int | None = None
    images_per_sec: Annotated[float | None, Field(description="training images per second; during the final evaluation, its own")] = None
    eta_seconds: Annotated[float | None, Field(description="of the whole job: the training left, then the final evaluation")] = None
    fraction: Annotated[float, Field(description="of the whole job done: the training, then the final evaluation")] = 0.0
    losses: dict[str, float] | None = None
    evaluation: Annotated[EvaluationProgress | None, Field(description="the final report's progress, once it has started")] = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


class TrainingCallbacks:
    """Hooks the worker (or the CLI) implements; every method has a do-nothing default."""

    def on_stage(self, stage: Stage, detail: str = "") -> None:
        """A new stage begins; `detail` says what exactly, in words for the user."""

    def on_step(self, progress: StepProgress) -> None: ...

    def on_epoch(self, record: EpochRecord) -> None: ...

    def on_evaluation(self, progress: EvaluationProgress) -> None: ...

    def on_resume(self, history: list[EpochRecord]) -> None:
        """Called when training continues from a checkpoint, with the epochs it already holds."""

    def should_stop(self) -> bool:
        return False
