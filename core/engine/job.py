"""One robustification job end to end: train (resuming if a checkpoint exists), report on the
test set, export weights and the model card. The worker, the CLI and the tests all call `run_job`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import DatasetSplits
from .evaluation import final_report
from .export import library_versions, save_weights, write_json
from .models import create_model
from .spec import JobSpec
from .trainer import TrainingCallbacks, Trainer

ARTIFACTS_DIR = "artifacts"
STUDENT_FILE = "student.safetensors"
SWA_STUDENT_FILE = "swa_student.safetensors"
PEER_FILE = "peer.safetensors"
MODEL_CARD_FILE = "model_card.json"


@dataclass
class JobResult:
    model_card: dict[str, Any]
    artifacts: dict[str, Path]

    @property
    def report(self) -> dict[str, Any]:
        return self.model_card["metrics"]


def run_job(
    spec: JobSpec,
    splits: DatasetSplits,
    workdir: Path,
    *,
    device: str | torch.device | None = None,
    callbacks: TrainingCallbacks | None = None,
    progress_interval: float = 2.0,
) -> JobResult:
    callbacks = callbacks or TrainingCallbacks()
    trainer = Trainer(spec, splits, workdir=workdir, device=device, callbacks=callbacks, progress_interval=progress_interval)
    trainer.fit()

    callbacks.on_phase("evaluating")
    ev = spec.evaluation
    test = splits.test
    if ev.n_examples is not None and ev.n_examples < len(test):
        test = test.subset(torch.arange(ev.n_examples))
    out_dir = Path(workdir) / ARTIFACTS_DIR
    artifacts: dict[str, Path] = {}
    metrics: dict[str, Any] = {}
    for key, best, architecture, file_name in (
        ("student", trainer.best_student, spec.student, STUDENT_FILE),
        ("swa_student", trainer.best_swa, spec.student, SWA_STUDENT_FILE),
    ):
        if best.state is None:
            continue
        model = create_model(architecture, **trainer.model_kwargs)
        model.load_state_dict(best.state)
        model.to(trainer.device).eval()
        test_metrics = final_report(
            model, test, epsilon=spec.epsilon, step_size=spec.attack_step_size, pgd_steps=ev.pgd_steps,
            run_autoattack=ev.autoattack, batch_size=ev.batch_size, device=trainer.device, seed=spec.seed,
            on_phase=lambda phase, key=key: callbacks.on_phase(f"evaluating {key}: {phase}"),
        )
        metrics[key] = {"best_epoch": best.epoch, "validation": best.metrics, "test": test_metrics}
        artifacts[key] = out_dir / file_name
        save_weights(model, artifacts[key], architecture=architecture, **_shape_info(splits))
    if trainer.nets.peer is not None:
        artifacts["peer"] = out_dir / PEER_FILE
        save_weights(trainer.nets.peer, artifacts["peer"], architecture=spec.peer_architecture, **_shape_info(splits))

    card = model_card(spec, splits, metrics, trainer, n_test=len(test))
    artifacts["model_card"] = out_dir / MODEL_CARD_FILE
    write_json(artifacts["model_card"], card)
    return JobResult(card, artifacts)


def _shape_info(splits: DatasetSplits) -> dict[str, Any]:
    return {"num_classes": len(splits.classes), "input_shape": splits.input_shape, "classes": splits.classes}


def model_card(spec: JobSpec, splits: DatasetSplits, metrics: dict[str, Any], trainer: Trainer, n_test: int) -> dict[str, Any]:
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": spec.method,
        "architecture": {"student": spec.student, "peer": spec.peer_architecture},
        "classes": splits.classes,
        "input_shape": list(splits.input_shape),
        "input_range": [0.0, 1.0],
        "threat_model": {"norm": "Linf", "epsilon": spec.epsilon},
        "dataset": {
            "name": splits.name,
            "fingerprint": splits.fingerprint,
            "train_examples": len(splits.train),
            "validation_examples": len(splits.val),
            "test_examples": len(splits.test),
            "test_examples_evaluated": n_test,
        },
        "hyperparameters": spec.model_dump(mode="json"),
        "metrics": metrics,
        "history": [r.to_dict() for r in trainer.history],
        "device": str(trainer.device),
        "library_versions": library_versions(),
    }
