"""The model card: a JSON record of what was trained, how, and how well (`build_model_card`), and
its human-readable Markdown rendering (`model_card_markdown`).

A job writes the card twice: once with its weights, before the final evaluation (evaluation status
"pending"), and again with the test-set results. A card therefore always says what was and was not
evaluated, and why."""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Any

from .datasets import DatasetSplits
from .export import library_versions
from .report import MODEL_LABELS, metric_label, per_class_table
from .spec import JobSpec
from .state_io import atomic_write

# evaluation["status"]
PENDING = "pending"  # the weights are written; the test-set evaluation has not finished
COMPLETE = "complete"  # every planned attack ran on every model
INCOMPLETE = "incomplete"  # some attacks failed: see evaluation["failures"]
NOT_RUN = "not run"  # training stopped before its last epoch: see training["stopped"]


def build_model_card(
    spec: JobSpec,
    splits: DatasetSplits,
    *,
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    evaluation: dict[str, Any],
    exports: dict[str, str],
    artifacts: dict[str, str],
    device: str | None,
    warnings: list[dict[str, str]] | None = None,
    stopped: str | None = None,
    execution: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """The JSON card. `metrics`: {model: {best_epoch, validation, test}}; `evaluation`: {status, images
    (per metric key), failures, ...}; `exports`: {artifact name: "ok" or "failed: ..."}; `artifacts`:
    {artifact name: file name}; `warnings`: outcomes to distrust (evaluation.outcome_warnings); `stopped`: why
    training ended early, if it did; `job_id`: the service's job that trained the model."""
    n_evaluated = max(evaluation.get("images", {}).values(), default=0)
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "job_id": job_id,
        "method": spec.method,
        "architecture": {"student": spec.student, "peer": spec.peer_architecture},
        "classes": splits.classes,
        "input_shape": list(splits.input_shape),
        "input_range": [0.0, 1.0],
        "threat_model": {"norm": "Linf", "epsilon": spec.epsilon},
        "dataset": {
            "name": splits.name,
            "id": splits.dataset_id,
            "fingerprint": splits.fingerprint,
            "train_examples": len(splits.train),
            "validation_examples": len(splits.val),
            "test_examples": len(splits.test),
            "test_examples_evaluated": n_evaluated,
            "protocol": splits.protocol,
        },
        "training": {
            "epochs": spec.epochs,
            "epochs_completed": len(history),
            "stopped": stopped,
            "lr_decay_epochs": spec.decay_epochs,  # as epochs, where the spec gives fractions of training
            "swa_start": spec.resolved_swa_start if spec.swa else None,
        },
        "hyperparameters": spec.model_dump(mode="json"),
        "metrics": metrics,
        "warnings": list(warnings or []),
        "evaluation": evaluation,
        "exports": dict(exports),
        "artifacts": dict(artifacts),
        "history": history,
        "device": device,
        "execution": execution,  # Trainer.execution_report(): precision, channels_last, CUDA graph or eager and why
        "library_versions": library_versions(),
    }


# --- Markdown -----------------------------------------------------------------------------

METHOD_NAMES = {"peeraid": "PeerAiD", "pgd_at": "PGD-AT", "trades": "TRADES", "natural": "natural (non-adversarial) training"}
EXPORT_NAMES = {"onnx": "ONNX", "pt2": "torch.export", "markdown": "Markdown model card"}
MAX_LISTED_CLASSES = 20


def write_model_card_markdown(path: Path, card: dict[str, Any]) -> None:
    text = model_card_markdown(card)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def model_card_markdown(card: dict[str, Any]) -> str:
    """A human-readable model card for the JSON card `build_model_card` builds; deterministic."""
    sections = (
        _md_title,
        _md_warnings,
        _md_intended_use,
        _md_loading,
        _md_results,
        _md_training,
        _md_dataset,
        _md_versions,
        _md_limitations,
    )
    return "\n\n".join(text for text in (section(card) for section in sections) if text) + "\n"


def _code(text: Any) -> str:
    """`text` as an inline code span nothing in it can close: control characters (line breaks) become spaces,
    and the fence is one backtick longer than the longest run of backticks inside (CommonMark)."""
    text = re.sub(r"[\x00-\x1f\x7f]", " ", str(text))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _text(text: Any) -> str:
    """`text` (a user's names: classes, datasets) as plain Markdown text within a line: the characters that
    could start inline markup or HTML escaped, line breaks as spaces (so no line-start markup can begin)."""
    return re.sub(r"([\\`*_\[\]<>&~|])", r"\\\1", re.sub(r"[\x00-\x1f\x7f]", " ", str(text)))


def _md_title(card: dict[str, Any]) -> str:
    arch, data = card["architecture"], card["dataset"]
    peer = f" with a `{arch['peer']}` peer" if arch.get("peer") else ""
    return (
        f"# {arch['student']} trained with {_method(card)} on {_text(data['name'])}\n\n"
        f"An adversarially trained image classifier: a `{arch['student']}` student trained with {_method(card)}{peer} "
        f"on the dataset {_code(data['name'])}. Created {card['created']}"
        + (f" by job {_code(card['job_id'])}" if card.get("job_id") else "")
        + "."
    )


def _md_warnings(card: dict[str, Any]) -> str:
    if not card["warnings"]:
        return ""
    advice = dict.fromkeys(w["advice"] for w in card["warnings"])
    warnings = [f"- **Warning**: {_text(w['message'])}." for w in card["warnings"]]
    return "\n".join(["## Warnings", "", *warnings, "", *(f"What to try: {_text(a)}." for a in advice)])


def _md_intended_use(card: dict[str, Any]) -> str:
    classes, eps = card["classes"], card["threat_model"]["epsilon"]
    listed = ", ".join(_code(c) for c in classes[:MAX_LISTED_CLASSES])
    if len(classes) > MAX_LISTED_CLASSES:
        listed += f", … ({len(classes) - MAX_LISTED_CLASSES} more)"
    low, high = card["input_range"]
    return "\n".join(
        [
            "## Intended use and threat model",
            "",
            f"- **Task**: classify images from the distribution of {_code(card['dataset']['name'])} into {len(classes)} classes: {listed}.",
            f"- **Input**: float32 tensor N×{_shape(card)} (N×C×H×W), pixel values in [{low:g}, {high:g}], "
            "no mean/std normalisation (the network takes raw scaled pixels).",
            f"- **Output**: {len(classes)} logits per image, in the class order above.",
            f"- **Threat model**: {_norm(card)} perturbations of radius ε = {_per255(eps)} (≈ {eps:.4f}) on [{low:g}, {high:g}] inputs.",
            "- **Intended use**: classification where small adversarial perturbations within that budget are a concern, "
            "and research on adversarial robustness.",
        ]
    )


_LOADING_SNIPPETS = {
    "onnx": (
        "ONNX (`{file}`, opset ≥ 17, any batch size), with onnxruntime alone:",
        "import onnxruntime\n"
        'session = onnxruntime.InferenceSession("{file}", providers=["CPUExecutionProvider"])\n'
        'logits = session.run(["logits"], {{"input": x}})[0]  # x: numpy float32 N×C×H×W in [0, 1]',
    ),
    "pt2": (
        "torch.export program (`{file}`, any batch size), with PyTorch alone:",
        'import torch\nmodel = torch.export.load("{file}").module()\nlogits = model(x)  # x: torch float32 N×C×H×W in [0, 1]',
    ),
}


def _md_loading(card: dict[str, Any]) -> str:
    files = card.get("artifacts", {})
    weights = [files[key] for key in ("student", "swa_student", "last_student") if key in files]
    lines = ["## How to load", ""]
    if weights:
        others = "; " + ", ".join(f"`{w}`" for w in weights[1:]) + " likewise" if len(weights) > 1 else ""
        lines += [
            f"PyTorch, from the safetensors weights (`{weights[0]}`{others}):",
            "",
            "```python",
            "from peeraid_models import load_model  # pip install ./models, from the service's repository (PyTorch alone)",
            f'model, meta = load_model("{weights[0]}")  # eval mode; meta["classes"] names the outputs',
            f"logits = model(x)  # x: float32 N×{_shape(card)} in [0, 1]",
            "```",
        ]
    for name, status in card.get("exports", {}).items():
        model, _, fmt = name.rpartition("_")
        if status == "ok" and fmt in _LOADING_SNIPPETS and name in files and model == "student":
            intro, code = _LOADING_SNIPPETS[fmt]
            lines += ["", intro.format(file=files[name]), "", "```python", code.format(file=files[name]), "```"]
    exported = [files[n] for n, s in card.get("exports", {}).items() if s == "ok" and n in files and not n.startswith("student_")]
    if exported:
        lines += ["", "The SWA student's exports load the same way: " + ", ".join(f"`{f}`" for f in exported) + "."]
    for name, status in card.get("exports", {}).items():
        if status != "ok":
            lines += ["", f"The {_export_label(name)} export is not available ({status})."]
    return "\n".join(lines)


def _md_results(card: dict[str, Any]) -> str:
    metrics, data, evaluation = card["metrics"], card["dataset"], card["evaluation"]
    eps = _per255(card["threat_model"]["epsilon"])
    alpha = _per255(card["hyperparameters"]["attack_step_size"])
    lines = ["## Results", ""]
    status = evaluation["status"]
    if status == NOT_RUN:
        lines += [
            f"Not evaluated on the test set: {card['training']['stopped']}. The validation results below "
            "are those of the epochs that finished.",
            "",
        ]
    elif status == PENDING:
        lines += [
            "The test-set evaluation had not finished when this card was written; the validation results below selected the models.",
            "",
        ]
    else:
        images = evaluation["images"]
        counts = ", ".join(f"{metric_label(key)} {n}" for key, n in images.items())
        sample = evaluation.get("sample") or {}
        drawn = (
            f"; a {sample['method']} of the split (seed {sample.get('seed')}), the same images for every model and attack"
            if sample.get("method") == "class-stratified sample"
            else ""
        )
        lines += [
            f"Accuracy on the test split ({data['test_examples']} images; images used per attack: {counts}{drawn}), "
            f"attacks within {_norm(card)} ε = {eps} (PGD step α = {alpha}, one random start). Best epoch counts from 1.",
            "",
            *_md_metric_table(metrics, "test", list(images)),
        ]
        same_images = {key: m for key, m in metrics.items() if m.get("test_on_autoattack_images")}
        if same_images:
            lines += [
                "",
                f"On the {images.get('autoattack_acc')} images AutoAttack ran on, every attack (so that they compare on the same images):",
                "",
                *_md_metric_table(same_images, "test_on_autoattack_images", list(images)),
            ]
        if "autoattack" in evaluation:
            lines += ["", f"AutoAttack: {evaluation['autoattack']['description']}."]
        else:
            lines += ["", "AutoAttack was not run."]
        for failure in evaluation.get("failures", []):
            lines += [
                "",
                f"Not evaluated: {failure['attack']} on the {MODEL_LABELS.get(failure['model'], failure['model']).lower()} "
                f"failed ({failure['error']}).",
            ]
        lines += ["", *_md_per_class(metrics, evaluation), ""]
    validation_keys = list(dict.fromkeys(k for m in metrics.values() for k in m["validation"]))
    lines += [
        f"Validation set ({data['validation_examples']} images), which selected each model's best epoch by PGD accuracy:",
        "",
        *_md_metric_table(metrics, "validation", validation_keys, card["hyperparameters"]["eval_pgd_steps"]),
    ]
    return "\n".join(lines)


def _md_metric_table(metrics: dict[str, Any], split: str, columns: list[str], validation_pgd_steps: int | None = None) -> list[str]:
    def label(key: str) -> str:
        return f"PGD-{validation_pgd_steps}" if key == "pgd_acc" and validation_pgd_steps else metric_label(key)

    rows = [
        "| Model | Best epoch | " + " | ".join(label(c) for c in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for key, m in metrics.items():
        values = [_percent(m[split].get(c)) for c in columns]
        rows.append(f"| {MODEL_LABELS.get(key, key)} | {m['best_epoch']} | " + " | ".join(values) + " |")
    return rows


MAX_PER_CLASS_ROWS = 50


def _md_per_class(metrics: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    """Per model, a row per class: its test images and its accuracy under each attack (AutoAttack's on its own images)."""
    lines = ["### Per class"]
    for key, m in metrics.items():
        columns, rows = per_class_table(m, evaluation)
        if not rows:
            continue
        fewer = rows[0][2] is not None
        images_column = "Images (AutoAttack's)" if fewer else "Images"
        lines += [
            "",
            f"{MODEL_LABELS.get(key, key)}:",
            "",
            f"| Class | {images_column} | " + " | ".join(metric_label(c) for c in columns) + " |",
            "|---|---:|" + "---:|" * len(columns),
        ]
        for name, n, n_autoattack, values in rows[:MAX_PER_CLASS_ROWS]:
            images = f"{n} ({n_autoattack})" if fewer else f"{n}"
            lines.append(f"| {_text(name)} | {images} | " + " | ".join(_percent(v) for v in values) + " |")
        if len(rows) > MAX_PER_CLASS_ROWS:
            lines += ["", f"… and {len(rows) - MAX_PER_CLASS_ROWS} more classes: every class is in model_card.json (`test_per_class`)."]
    return lines if len(lines) > 1 else []


def _md_training(card: dict[str, Any]) -> str:
    hp, arch, training = card["hyperparameters"], card["architecture"], card["training"]
    eps = hp["epsilon"]
    epochs = str(hp["epochs"])
    if training["stopped"]:
        epochs = f"{training['epochs_completed']} of {hp['epochs']} ({training['stopped']})"
    rows = [
        ("Method", _method(card)),
        ("Student / peer", f"`{arch['student']}` / " + (f"`{arch['peer']}`" if arch.get("peer") else "none")),
        ("Epochs", epochs),
        ("Batch size", hp["batch_size"]),
        ("Optimiser", f"SGD, momentum {hp['momentum']:g}, weight decay {hp['weight_decay']:g}"),
        ("Learning rate", f"{hp['lr']:g}" + (f" (peer {hp['peer_lr']:g})" if hp.get("peer_lr") else "")),
        ("LR schedule", f"step, ×{hp['lr_decay_factor']:g} after epochs {training.get('lr_decay_epochs', hp['lr_decay_epochs'])}"),
        ("Training attack", f"PGD, ε = {_per255(eps)}, step α = {_per255(hp['attack_step_size'])}, K = {hp['attack_steps']} steps"),
        ("Validation attack (per epoch)", f"PGD-{hp['eval_pgd_steps']}"),
    ]
    if hp["method"] == "peeraid":
        w = hp["peeraid"]
        rows.append(
            (
                "PeerAiD weights",
                f"τ = {w['tau']:g}, γ1 = {w['gamma1']:g}, γ2 = {w['gamma2']:g}, τp = {w['tau_peer']:g}, "
                f"λ1 = {w['lambda1']:g}, λ2 = {w['lambda2']:g}, λ3 = {w['lambda3']:g}",
            )
        )
    if hp["method"] == "trades":
        rows.append(("TRADES β", f"{hp['trades_beta']:g}"))
    swa_start = training.get("swa_start", hp.get("swa_start"))
    rows += [
        ("SWA student", f"averaged after epoch {swa_start}" if hp["swa"] else "off"),
        ("Augmentation", f"random crop (padding {hp['crop_padding']}) + horizontal flip" if hp["augment"] else "none"),
        ("Validation fraction", f"{hp['val_fraction']:g}"),
        ("Seed", hp["seed"]),
        ("Precision / device", f"{hp['precision']} / {card['device'] or 'not recorded'}"),
    ]
    return "## Training setup\n\n| Setting | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _md_dataset(card: dict[str, Any]) -> str:
    d = card["dataset"]
    lines = [
        "## Dataset",
        "",
        f"- **Name**: {_code(d['name'])}" + (f" (id {_code(d['id'])})" if d.get("id") else ""),
        f"- **Fingerprint**: `{d['fingerprint']}` (SHA-256 of the decoded training and test data, as the API shows it)",
        f"- **Splits**: {d['train_examples']} training, {d['validation_examples']} validation, {d['test_examples']} test "
        f"images ({d['test_examples_evaluated']} test images evaluated)",
    ]
    if d.get("protocol"):
        lines.append(f"- **Model selection**: {d['protocol']}")
    return "\n".join(lines)


def _md_versions(card: dict[str, Any]) -> str:
    versions = "\n".join(f"- {name} {version}" for name, version in card["library_versions"].items())
    return f"## Library versions\n\n{versions}"


def _md_limitations(card: dict[str, Any]) -> str:
    evaluation = card["evaluation"]
    counts = sorted(set(evaluation["images"].values()))
    eps = _per255(card["threat_model"]["epsilon"])
    lines = ["## Limitations", ""]
    if evaluation["status"] in (COMPLETE, INCOMPLETE) and counts:
        errors = " and ".join(f"{50 / math.sqrt(n):.1f} points with {n} images" for n in counts)
        lines += [
            f"- Robustness was measured only against {_norm(card)} attacks with ε = {eps}, on at most {counts[-1]} images of "
            f"the test split of {_code(card['dataset']['name'])}. Other threat models (L2, patches, larger ε), corruptions and "
            "distribution shift were not evaluated.",
            "- Attack accuracies are upper bounds on the true robust accuracy: a stronger or adaptive attack may lower them "
            "(AutoAttack, where reported, is the most reliable figure"
            + (f", here on {evaluation['images']['autoattack_acc']} of the images" if _autoattack_subset(evaluation) else "")
            + ").",
            f"- Each accuracy has a standard error of up to {errors}.",
        ]
    else:
        lines += ["- Robustness on the test split was not measured; the validation figures come from the per-epoch PGD attack only."]
    lines.append(
        f"- Inputs must be scaled to [0, 1] at C×H×W = {_shape(card)}; changes made before that scaling (resizing, compression) "
        "are outside the threat model."
    )
    return "\n".join(lines)


def _autoattack_subset(evaluation: dict[str, Any]) -> bool:
    images = evaluation.get("images", {})
    return "autoattack_acc" in images and images["autoattack_acc"] < max(images.values())


def _export_label(name: str) -> str:
    model, _, fmt = name.rpartition("_")
    if name == "model_card_markdown":
        return EXPORT_NAMES["markdown"]
    return f"{MODEL_LABELS.get(model, model).lower()}'s {EXPORT_NAMES.get(fmt, fmt)}"


def _method(card: dict[str, Any]) -> str:
    return METHOD_NAMES.get(card["method"], card["method"])


def _norm(card: dict[str, Any]) -> str:
    return {"Linf": "L∞"}.get(card["threat_model"]["norm"], card["threat_model"]["norm"])


def _shape(card: dict[str, Any]) -> str:
    return "×".join(map(str, card["input_shape"]))


def _per255(value: float) -> str:
    """8/255 for 0.03137…; 4.5/255 for a non-integer numerator."""
    steps = value * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{steps:.3g}/255"


def _percent(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2%}"
    return "—" if value is None else str(value)
