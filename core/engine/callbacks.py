"""What the engine tells its caller while a job runs: typed events, and the callbacks that receive them.

The worker (database), the command line (progress bars) and the tests implement `TrainingCallbacks`;
the engine calls them from the training thread. Epochs in events are numbered from 1 (the first epoch
is epoch 1), as users count them; `lr_decay_epochs` and `swa_start` in the spec count completed epochs,
so "decay at 214" means epochs 1–214 run at the initial rate and epoch 215 at the decayed one.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


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


@dataclass
class EvaluationProgress:
    """The final report's progress: which model and attack, how far, and the robust accuracy so far; the
    fraction of the whole final evaluation done (every model and attack, by planned work) and its ETA."""

    model: str  # "student" or "swa_student"
    attack: str  # e.g. "clean, FGSM, PGD-20" or "AutoAttack"
    batch: int  # batches done, 1-based
    batches: int
    accuracy_so_far: float | None
    eta_seconds: float | None  # of the whole final evaluation
    fraction: float = 0.0  # of the whole final evaluation
    images_per_sec: float | None = None  # in this model's attack so far


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
