"""One robustification job end to end: train (resuming if a checkpoint exists); write the models
(safetensors weights, ONNX files and torch.export programs) and a model card; then evaluate them on the test set and
rewrite the card with the results. The models are on disk before the final evaluation starts, so a
failing attack costs only its own figures, never the trained model.

The worker, the CLI and the tests call `run_job`; the worker calls `export_checkpoint_student` when
a job is cancelled or fails after an epoch finished, so that the job still leaves a usable model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peeraid_models import create_model
from torch import nn

from .artifacts import ARTIFACTS, ARTIFACTS_DIR
from .attacks import AutoAttackSet
from .callbacks import Stage, TrainingCallbacks
from .datasets import DatasetSplits
from .errors import CheckpointError
from .evaluation import EvaluationTracker, evaluation_sample, final_report, planned_work, subset_warning
from .export import export_onnx, export_program, save_weights, write_json
from .model_card import COMPLETE, INCOMPLETE, NOT_RUN, PENDING, build_model_card, write_model_card_markdown
from .report import AUTOATTACK_KEY, report_keys
from .spec import JobSpec, build_spec
from .state_io import unprefixed
from .trainer import CHECKPOINT_NAME, Trainer, read_checkpoint

MAX_ERROR_CHARS = 500
EXPORT_FORMATS = {"onnx": export_onnx, "pt2": export_program}  # artifact "<model>_<format>" for each student model


@dataclass
class JobResult:
    model_card: dict[str, Any]
    artifacts: dict[str, Path]

    @property
    def report(self) -> dict[str, Any]:
        """{model: {best_epoch, validation, test}}; `test` holds only the attacks that ran."""
        return self.model_card["metrics"]

    @property
    def warnings(self) -> list[dict[str, str]]:
        """Outcomes to distrust ([{model, kind, message, advice}]): a model at chance, or predicting one class."""
        return self.model_card["warnings"]

    @property
    def evaluation(self) -> dict[str, Any]:
        """status, images per metric, failures [{model, attack, error}], and the AutoAttack set (if it ran)."""
        return self.model_card["evaluation"]


def run_job(
    spec: JobSpec,
    splits: DatasetSplits,
    workdir: Path,
    *,
    device: str | torch.device | None = None,
    callbacks: TrainingCallbacks | None = None,
    progress_interval: float = 2.0,
    job_id: str | None = None,
) -> JobResult:
    """`job_id`: the service's job, named in the model card."""
    callbacks = callbacks or TrainingCallbacks()
    trainer = Trainer(spec, splits, workdir=workdir, device=device, callbacks=callbacks, progress_interval=progress_interval)
    trainer.fit()

    out_dir = Path(workdir) / ARTIFACTS_DIR
    callbacks.on_stage(Stage.EXPORTING, "saving the weights; exporting the students to ONNX and torch.export")
    best = {"student": trainer.best_student, "swa_student": trainer.best_swa}
    models = {key: _build(spec.student, trainer.model_kwargs, b.state) for key, b in best.items() if b.state is not None}
    metrics = {key: {"best_epoch": best[key].epoch, "validation": best[key].metrics, "test": {}} for key in models}
    artifacts = {key: _save(models[key], out_dir, key, spec.student, splits) for key in models}
    if trainer.nets.peer is not None and spec.peer_architecture:
        artifacts["peer"] = _save(trainer.nets.peer, out_dir, "peer", spec.peer_architecture, splits)
    exports = _export_portable(models, out_dir, splits.input_shape, artifacts)

    ev = spec.evaluation
    sample = evaluation_sample(splits.test, ev.n_examples, ev.autoattack_n_examples if ev.autoattack else None, spec.seed)
    test = splits.test.subset(sample.index)
    aa_images = sample.autoattack_images
    planned = {key: aa_images if key == AUTOATTACK_KEY else len(test) for key in report_keys(ev.pgd_steps, ev.autoattack)}
    card_args = dict(
        history=[r.to_dict() for r in trainer.history], device=str(trainer.device), execution=trainer.execution_report(), job_id=job_id
    )
    evaluation: dict[str, Any] = {"status": PENDING, "images": planned, "sample": sample.describe(splits.test), "failures": []}
    if ev.autoattack:
        evaluation["autoattack"] = AutoAttackSet(len(splits.classes)).to_dict()
    card = _write_cards(out_dir, spec, splits, artifacts, exports, metrics=metrics, evaluation=evaluation, **card_args)

    callbacks.on_stage(Stage.EVALUATING, "evaluating on the test set")
    work = planned_work(list(models), len(test), ev.pgd_steps, aa_images if ev.autoattack else None, len(splits.classes))
    tracker = EvaluationTracker(callbacks, work)
    subset = subset_warning(len(splits.test), len(test), aa_images if ev.autoattack else None, spec.seed)
    warnings: list[dict[str, str]] = [subset] if subset else []
    for key, model in models.items():
        report = final_report(
            model.to(trainer.device),
            test,
            name=key,
            epsilon=spec.epsilon,
            step_size=spec.attack_step_size,
            pgd_steps=ev.pgd_steps,
            run_autoattack=ev.autoattack,
            autoattack_index=sample.autoattack_index,
            batch_size=ev.batch_size,
            device=trainer.device,
            seed=spec.seed,
            tracker=tracker,
        )
        metrics[key]["test"] = report.metrics
        metrics[key]["test_per_class"] = report.per_class
        if report.on_autoattack_images:
            metrics[key]["test_on_autoattack_images"] = report.on_autoattack_images
        evaluation["failures"] += [{"model": key, "attack": attack, "error": _sentence(err)} for attack, err in report.failures.items()]
        warnings += report.warnings
    evaluation["status"] = INCOMPLETE if evaluation["failures"] else COMPLETE
    card = _write_cards(out_dir, spec, splits, artifacts, exports, metrics=metrics, evaluation=evaluation, warnings=warnings, **card_args)
    return JobResult(card, artifacts)


def export_checkpoint_student(workdir: Path, splits: DatasetSplits, *, stopped: str, job_id: str | None = None) -> dict[str, Path]:
    """For a job that stopped before its end (`stopped` says why, e.g. "cancelled after epoch 3"): write the
    checkpoint's models as weights files, with a model card that says training did not finish.

    Writes `last_student` (the student of the last finished epoch), `student` and `swa_student` (the best so
    far by validation PGD accuracy, where any) and the model cards; returns {artifact name: path}. Raises
    CheckpointError if no epoch finished or the checkpoint belongs to other data."""
    path = Path(workdir) / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no epoch finished: {path} does not exist")
    tensors, meta = read_checkpoint(path)
    if not splits.matches(meta["dataset_fingerprint"]):
        raise CheckpointError(f"{path} was written for a different dataset")
    spec = build_spec(None, meta["spec"])
    kwargs = dict(num_classes=len(splits.classes), in_channels=splits.input_shape[0])
    out_dir = Path(workdir) / ARTIFACTS_DIR
    states = {"last_student": ("student", None), "student": ("best_student", "best_student"), "swa_student": ("best_swa", "best_swa")}
    artifacts: dict[str, Path] = {}
    metrics: dict[str, Any] = {}
    for key, (prefix, best_key) in states.items():
        state = unprefixed(prefix, tensors)
        if not state:
            continue
        artifacts[key] = _save(_build(spec.student, kwargs, state), out_dir, key, spec.student, splits)
        if best_key in meta:
            metrics[key] = {"best_epoch": meta[best_key]["epoch"], "validation": meta[best_key]["metrics"], "test": {}}
    evaluation = {"status": NOT_RUN, "images": {}, "failures": []}
    _write_cards(
        out_dir,
        spec,
        splits,
        artifacts,
        {},
        metrics=metrics,
        evaluation=evaluation,
        history=meta["history"],
        device=None,
        stopped=stopped,
        job_id=job_id,
    )
    return artifacts


def _build(architecture: str, model_kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    model = create_model(architecture, **model_kwargs)
    model.load_state_dict(state)
    return model.eval()


def _save(model: nn.Module, out_dir: Path, key: str, architecture: str, splits: DatasetSplits) -> Path:
    path = out_dir / ARTIFACTS[key].file_name
    save_weights(
        model, path, architecture=architecture, num_classes=len(splits.classes), input_shape=splits.input_shape, classes=splits.classes
    )
    return path


def _export_portable(models: dict[str, nn.Module], out_dir: Path, input_shape, artifacts: dict[str, Path]) -> dict[str, str]:
    """Export each student model in each portable format: {artifact name: "ok" or "failed: ..."}. A failed
    export is reported, not raised, and leaves no file."""
    status = {}
    for key, model in models.items():
        for fmt, export in EXPORT_FORMATS.items():
            name = f"{key}_{fmt}"
            path = out_dir / ARTIFACTS[name].file_name
            try:
                export(model, path, input_shape)
            except Exception as err:
                path.unlink(missing_ok=True)  # a resumed job may have left one from an earlier run
                status[name] = "failed: " + _sentence(err)
            else:
                artifacts[name] = path
                status[name] = "ok"
    return status


def _write_cards(
    out_dir: Path, spec: JobSpec, splits: DatasetSplits, artifacts: dict[str, Path], exports: dict[str, str], **card_fields
) -> dict[str, Any]:
    """Write model_card.md and model_card.json (last, so that it records the Markdown card's status); adds both to `artifacts`."""
    markdown = out_dir / ARTIFACTS["model_card_markdown"].file_name
    names = {name: ARTIFACTS[name].file_name for name in [*artifacts, "model_card_markdown", "model_card"]}
    card = build_model_card(spec, splits, exports=exports, artifacts=names, **card_fields)
    try:
        write_model_card_markdown(markdown, card)
        artifacts["model_card_markdown"] = markdown
    except Exception as err:  # the Markdown card is a courtesy; it must not cost the trained model
        markdown.unlink(missing_ok=True)
        artifacts.pop("model_card_markdown", None)
        card["exports"]["model_card_markdown"] = "failed: " + _sentence(err)
        del card["artifacts"]["model_card_markdown"]
    artifacts["model_card"] = out_dir / ARTIFACTS["model_card"].file_name
    write_json(artifacts["model_card"], card)
    return card


def _sentence(err: BaseException) -> str:
    """The error in one line for the user: its type and message, at most MAX_ERROR_CHARS characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
