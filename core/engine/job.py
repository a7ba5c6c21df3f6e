"""One robustification job end to end: train (resuming if a checkpoint exists), report on the
test set, export weights (safetensors, ONNX, TorchScript) and the model card (JSON, Markdown).
The worker, the CLI and the tests all call `run_job`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .datasets import DatasetSplits
from .evaluation import final_report
from .export import export_onnx, export_torchscript, library_versions, save_weights, write_json, write_model_card_markdown
from .models import create_model
from .spec import JobSpec
from .callbacks import Stage, TrainingCallbacks
from .trainer import Trainer

ARTIFACTS_DIR = "artifacts"
STUDENT_FILE = "student.safetensors"
SWA_STUDENT_FILE = "swa_student.safetensors"
PEER_FILE = "peer.safetensors"
MODEL_CARD_FILE = "model_card.json"
STUDENT_ONNX_FILE = "student.onnx"
STUDENT_TORCHSCRIPT_FILE = "student.torchscript.pt"
MODEL_CARD_MARKDOWN_FILE = "model_card.md"
MAX_ERROR_CHARS = 500


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

    callbacks.on_stage(Stage.EVALUATING, "evaluating on the test set")
    ev = spec.evaluation
    test = splits.test
    if ev.n_examples is not None and ev.n_examples < len(test):
        test = test.subset(torch.arange(ev.n_examples))
    out_dir = Path(workdir) / ARTIFACTS_DIR
    artifacts: dict[str, Path] = {}
    metrics: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {}
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
            on_phase=lambda phase, key=key: callbacks.on_stage(Stage.EVALUATING, f"evaluating {key}: {phase}"),
        )
        metrics[key] = {"best_epoch": best.epoch, "validation": best.metrics, "test": test_metrics}
        models[key] = model
        artifacts[key] = out_dir / file_name
        save_weights(model, artifacts[key], architecture=architecture, **_shape_info(splits))
    if trainer.nets.peer is not None:
        artifacts["peer"] = out_dir / PEER_FILE
        save_weights(trainer.nets.peer, artifacts["peer"], architecture=spec.peer_architecture, **_shape_info(splits))

    exports: dict[str, str] = {}
    if "student" in models:
        callbacks.on_stage(Stage.EXPORTING, "exporting ONNX and TorchScript")
        exports = _export_portable(models["student"], out_dir, splits.input_shape, artifacts)

    card = model_card(spec, splits, metrics, trainer, n_test=len(test), exports=exports)
    markdown = out_dir / MODEL_CARD_MARKDOWN_FILE
    try:
        write_model_card_markdown(markdown, card)
        artifacts["model_card_markdown"] = markdown
    except Exception as err:  # the Markdown card is a courtesy; it must not cost the trained model
        markdown.unlink(missing_ok=True)
        card["exports"]["model_card_markdown"] = _failure(err)
    # last, so that it records the status of every other export
    artifacts["model_card"] = out_dir / MODEL_CARD_FILE
    write_json(artifacts["model_card"], card)
    return JobResult(card, artifacts)


def _export_portable(model: torch.nn.Module, out_dir: Path, input_shape, artifacts: dict[str, Path]) -> dict[str, str]:
    """Export the student to ONNX and TorchScript; a failed export is reported, not raised, and leaves no file."""
    status = {}
    for fmt, name, file_name, export in (
        ("onnx", "student_onnx", STUDENT_ONNX_FILE, export_onnx),
        ("torchscript", "student_torchscript", STUDENT_TORCHSCRIPT_FILE, export_torchscript),
    ):
        path = out_dir / file_name
        try:
            export(model, path, input_shape)
        except Exception as err:
            path.unlink(missing_ok=True)  # a resumed job may have left one from an earlier run
            status[fmt] = _failure(err)
        else:
            artifacts[name] = path
            status[fmt] = "ok"
    return status


def _failure(err: Exception) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return "failed: " + (text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…")


def _shape_info(splits: DatasetSplits) -> dict[str, Any]:
    return {"num_classes": len(splits.classes), "input_shape": splits.input_shape, "classes": splits.classes}


def model_card(
    spec: JobSpec, splits: DatasetSplits, metrics: dict[str, Any], trainer: Trainer, n_test: int,
    exports: dict[str, str] | None = None,
) -> dict[str, Any]:
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
            "protocol": splits.protocol,
        },
        "hyperparameters": spec.model_dump(mode="json"),
        "metrics": metrics,
        "exports": dict(exports or {}),
        "history": [r.to_dict() for r in trainer.history],
        "device": str(trainer.device),
        "library_versions": library_versions(),
    }
