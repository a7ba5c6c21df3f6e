"""Portable weights (safetensors, never pickle), ONNX and TorchScript exports, and the model card.

A weights file carries its architecture in the safetensors header, so `load_model(path)`
rebuilds the network without any other file (timm-style portable checkpoints). ONNX and
TorchScript files are checked against the PyTorch model's logits before they are kept."""

from __future__ import annotations

import copy
import json
import math
import platform
import re
import warnings
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ExportError
from .models import create_model
from .state_io import atomic_write, load_tensors, save_tensors

WEIGHTS_FORMAT = "peeraid-service/weights-v1"
ONNX_OPSET = 17
VERIFY_ATOL = 1e-4  # max |logit difference| allowed between an export and the fp32 PyTorch model
VERIFY_BATCH_SIZES = (1, 8)


def save_weights(model: nn.Module, path: Path, *, architecture: str, num_classes: int, input_shape, classes: list[str]) -> None:
    in_channels, height, _width = input_shape
    save_tensors(
        path,
        model.state_dict(),
        {
            "format": WEIGHTS_FORMAT,
            "architecture": architecture,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": height,
            "classes": classes,
        },
    )


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a weights file describes and load it (strict), in eval mode."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} is not a weights file of this service (format {meta.get('format')!r})")
    model = create_model(
        meta["architecture"], num_classes=meta["num_classes"], in_channels=meta["in_channels"]
    )
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), meta


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "safetensors", "pyautoattack", "numpy", "pydantic", "onnx", "onnxruntime", "peeraid-service"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


# --- ONNX and TorchScript -----------------------------------------------------------------


def export_torchscript(model: nn.Module, path: Path, input_shape) -> Path:
    """Trace the eval-mode model into a TorchScript file (any batch size), verified before it is kept."""
    model = _cpu_eval(model)

    def write(tmp: Path) -> None:
        with _quiet_deprecations(), torch.no_grad():
            # check_trace re-runs the model for nothing: verify_torchscript compares more inputs
            traced = torch.jit.trace(model, _probe(1, seed=1, input_shape=input_shape), check_trace=False)
            traced.save(str(tmp))
        verify_torchscript(tmp, model, input_shape)

    atomic_write(path, write)
    return Path(path)


def export_onnx(model: nn.Module, path: Path, input_shape) -> Path:
    """ONNX file with input "input" (N×C×H×W float32 in [0, 1]) and output "logits", any N; verified before it is kept."""
    model = _cpu_eval(model)

    def write(tmp: Path) -> None:
        with _quiet_deprecations():
            # The legacy TorchScript-based exporter (dynamo=False): exact for every registered
            # architecture, several times faster than the dynamo exporter, and needs no onnxscript.
            # Should a torch release drop it, use dynamo=True with onnxscript and
            # dynamic_shapes={"x": {0: torch.export.Dim("batch")}} instead of dynamic_axes.
            torch.onnx.export(
                model, (_probe(1, seed=1, input_shape=input_shape),), str(tmp), dynamo=False,
                input_names=["input"], output_names=["logits"], opset_version=ONNX_OPSET,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        verify_onnx(tmp, model, input_shape)

    atomic_write(path, write)
    return Path(path)


def verify_torchscript(path: Path, model: nn.Module, input_shape) -> None:
    """Raise ExportError unless the TorchScript file reproduces the model's logits at batch 1 and 8."""
    try:
        with _quiet_deprecations():
            loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ExportError(f"cannot load TorchScript file {path}: {err}") from err
    _compare_logits("TorchScript", loaded, _cpu_eval(model), input_shape)


def verify_onnx(path: Path, model: nn.Module, input_shape) -> None:
    """Raise ExportError unless onnxruntime (CPU) reproduces the model's logits at batch 1 and 8."""
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"invalid ONNX file {path}: {err}") from err
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (["input"], ["logits"]):
        raise ExportError(f"ONNX file {path} has inputs/outputs {names}, expected ['input'] and ['logits']")
    run = lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])  # noqa: E731
    _compare_logits("ONNX", run, _cpu_eval(model), input_shape)


def _compare_logits(kind: str, run, model: nn.Module, input_shape) -> None:
    for batch in VERIFY_BATCH_SIZES:
        x = _probe(batch, seed=0, input_shape=input_shape)
        with torch.no_grad():
            want = model(x)
            try:
                got = run(x)
            except Exception as err:
                raise ExportError(f"{kind} model fails on a batch of {batch}: {err}") from err
        if tuple(got.shape) != tuple(want.shape):
            raise ExportError(f"{kind} logits have shape {tuple(got.shape)} at batch {batch}, expected {tuple(want.shape)}")
        diff = (got.float() - want).abs().max().item()
        if not diff <= VERIFY_ATOL:  # NaN fails too
            raise ExportError(f"{kind} logits differ from PyTorch by {diff:.3g} at batch {batch} (tolerance {VERIFY_ATOL:g})")


def _probe(batch: int, *, seed: int, input_shape) -> torch.Tensor:
    return torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(seed))


def _cpu_eval(model: nn.Module) -> nn.Module:
    """The model in eval mode on the CPU in fp32; a copy unless it already is, so the caller's model is untouched."""
    tensors = list(model.parameters()) + list(model.buffers())
    if not any(m.training for m in model.modules()) and all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


@contextmanager
def _quiet_deprecations():
    # torch.jit and the legacy ONNX exporter warn on every call that they are deprecated; we chose them knowingly
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield


# --- Markdown model card ------------------------------------------------------------------

METHOD_NAMES = {"peeraid": "PeerAiD", "pgd_at": "PGD-AT", "trades": "TRADES", "natural": "natural (non-adversarial) training"}
MODEL_LABELS = {"student": "Student", "swa_student": "SWA student"}
FORMAT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript", "model_card_markdown": "Markdown model card"}
MAX_LISTED_CLASSES = 20


def write_model_card_markdown(path: Path, card: dict[str, Any]) -> None:
    text = model_card_markdown(card)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def model_card_markdown(card: dict[str, Any]) -> str:
    """A human-readable model card for the JSON card `core.engine.job.model_card` builds; deterministic."""
    sections = (_md_title, _md_intended_use, _md_loading, _md_results, _md_training, _md_dataset, _md_versions, _md_limitations)
    return "\n\n".join(section(card) for section in sections) + "\n"


def _md_title(card: dict[str, Any]) -> str:
    arch, data = card["architecture"], card["dataset"]
    peer = f" with a `{arch['peer']}` peer" if arch.get("peer") else ""
    return (
        f"# {arch['student']} trained with {_method(card)} on {data['name']}\n\n"
        f"An adversarially trained image classifier: a `{arch['student']}` student trained with {_method(card)}{peer} "
        f"on the dataset `{data['name']}`. Created {card['created']}."
    )


def _md_intended_use(card: dict[str, Any]) -> str:
    classes, eps = card["classes"], card["threat_model"]["epsilon"]
    listed = ", ".join(f"`{c}`" for c in classes[:MAX_LISTED_CLASSES])
    if len(classes) > MAX_LISTED_CLASSES:
        listed += f", … ({len(classes) - MAX_LISTED_CLASSES} more)"
    low, high = card["input_range"]
    return "\n".join([
        "## Intended use and threat model",
        "",
        f"- **Task**: classify images from the distribution of `{card['dataset']['name']}` into {len(classes)} classes: {listed}.",
        f"- **Input**: float32 tensor N×{_shape(card)} (N×C×H×W), pixel values in [{low:g}, {high:g}], "
        "no mean/std normalisation (the network takes raw scaled pixels).",
        f"- **Output**: {len(classes)} logits per image, in the class order above.",
        f"- **Threat model**: {_norm(card)} perturbations of radius ε = {_per255(eps)} (≈ {eps:.4f}) on [{low:g}, {high:g}] inputs.",
        "- **Intended use**: classification where small adversarial perturbations within that budget are a concern, "
        "and research on adversarial robustness.",
    ])


def _md_loading(card: dict[str, Any]) -> str:
    exports = card.get("exports", {})
    lines = [
        "## How to load",
        "",
        "PyTorch, from the safetensors weights (`student.safetensors`; `swa_student.safetensors` likewise):",
        "",
        "```python",
        "from core.engine import load_model",
        'model, meta = load_model("student.safetensors")  # eval mode; meta["classes"] names the outputs',
        f"logits = model(x)  # x: float32 N×{_shape(card)} in [0, 1]",
        "```",
    ]
    if exports.get("onnx") == "ok":
        lines += [
            "", "ONNX (`student.onnx`, opset ≥ 17, any batch size), with onnxruntime:", "",
            "```python",
            "import onnxruntime",
            'session = onnxruntime.InferenceSession("student.onnx", providers=["CPUExecutionProvider"])',
            'logits = session.run(["logits"], {"input": x})[0]  # x: numpy float32 N×C×H×W in [0, 1]',
            "```",
        ]
    if exports.get("torchscript") == "ok":
        lines += [
            "", "TorchScript (`student.torchscript.pt`, any batch size), without this package:", "",
            "```python",
            "import torch",
            'model = torch.jit.load("student.torchscript.pt")',
            "logits = model(x)",
            "```",
        ]
    for fmt, status in exports.items():
        if status != "ok":
            lines += ["", f"The {FORMAT_NAMES.get(fmt, fmt)} export is not available ({status})."]
    return "\n".join(lines)


def _md_results(card: dict[str, Any]) -> str:
    metrics, hp, data = card["metrics"], card["hyperparameters"], card["dataset"]
    eps = _per255(card["threat_model"]["epsilon"])
    lines = [
        "## Results",
        "",
        f"Accuracy on {data['test_examples_evaluated']} of the {data['test_examples']} test images, "
        f"attacks within {_norm(card)} ε = {eps} (PGD step α = {_per255(hp['attack_step_size'])}, one random start). "
        "Best epoch counts from 1.",
        "",
        *_md_metric_table(metrics, "test", hp),
    ]
    if not any("autoattack_acc" in m["test"] for m in metrics.values()):
        lines += ["", "AutoAttack was not run for this model."]
    lines += [
        "",
        f"Validation set ({data['validation_examples']} images), which selected each model's best epoch by PGD accuracy:",
        "",
        *_md_metric_table(metrics, "validation", hp),
    ]
    return "\n".join(lines)


def _md_metric_table(metrics: dict[str, Any], split: str, hp: dict[str, Any]) -> list[str]:
    columns = list(dict.fromkeys(name for m in metrics.values() for name in m[split]))
    rows = [
        "| Model | Best epoch | " + " | ".join(_metric_label(c, hp) for c in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for key, m in metrics.items():
        values = [_percent(m[split].get(c)) for c in columns]
        rows.append(f"| {MODEL_LABELS.get(key, key)} | {m['best_epoch']} | " + " | ".join(values) + " |")
    return rows


def _metric_label(name: str, hp: dict[str, Any]) -> str:
    stem = name.removesuffix("_acc")
    fixed = {"clean": "Clean", "fgsm": "FGSM", "autoattack": "AutoAttack", "pgd": f"PGD-{hp['eval_pgd_steps']}"}
    if stem in fixed:
        return fixed[stem]
    match = re.fullmatch(r"pgd(\d+)", stem)
    return f"PGD-{match.group(1)}" if match else name


def _md_training(card: dict[str, Any]) -> str:
    hp, arch = card["hyperparameters"], card["architecture"]
    eps = hp["epsilon"]
    rows = [
        ("Method", _method(card)),
        ("Student / peer", f"`{arch['student']}` / " + (f"`{arch['peer']}`" if arch.get("peer") else "none")),
        ("Epochs", hp["epochs"]),
        ("Batch size", hp["batch_size"]),
        ("Optimiser", f"SGD, momentum {hp['momentum']:g}, weight decay {hp['weight_decay']:g}"),
        ("Learning rate", f"{hp['lr']:g}" + (f" (peer {hp['peer_lr']:g})" if hp.get("peer_lr") else "")),
        ("LR schedule", f"step, ×{hp['lr_decay_factor']:g} at `lr_decay_epochs` = {hp['lr_decay_epochs']}"),
        ("Training attack", f"PGD, ε = {_per255(eps)}, step α = {_per255(hp['attack_step_size'])}, K = {hp['attack_steps']} steps"),
        ("Validation attack (per epoch)", f"PGD-{hp['eval_pgd_steps']}"),
    ]
    if hp["method"] == "peeraid":
        w = hp["peeraid"]
        rows.append(("PeerAiD weights", f"τ = {w['tau']:g}, γ1 = {w['gamma1']:g}, γ2 = {w['gamma2']:g}, τp = {w['tau_peer']:g}, "
                                         f"λ1 = {w['lambda1']:g}, λ2 = {w['lambda2']:g}, λ3 = {w['lambda3']:g}"))
    if hp["method"] == "trades":
        rows.append(("TRADES β", f"{hp['trades_beta']:g}"))
    swa_start = hp["swa_start"] if hp.get("swa_start") is not None else "the first LR decay epoch"
    rows += [
        ("SWA student", f"averaged from `swa_start` = {swa_start}" if hp["swa"] else "off"),
        ("Augmentation", f"random crop (padding {hp['crop_padding']}) + horizontal flip" if hp["augment"] else "none"),
        ("Validation fraction", f"{hp['val_fraction']:g}"),
        ("Seed", hp["seed"]),
        ("Precision / device", f"{hp['precision']} / {card['device']}"),
    ]
    return "## Training setup\n\n| Setting | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _md_dataset(card: dict[str, Any]) -> str:
    d = card["dataset"]
    return "\n".join([
        "## Dataset",
        "",
        f"- **Name**: `{d['name']}`",
        f"- **Fingerprint**: `{d['fingerprint']}`",
        f"- **Splits**: {d['train_examples']} training, {d['validation_examples']} validation, {d['test_examples']} test "
        f"images ({d['test_examples_evaluated']} test images evaluated)",
    ])


def _md_versions(card: dict[str, Any]) -> str:
    versions = "\n".join(f"- {name} {version}" for name, version in card["library_versions"].items())
    return f"## Library versions\n\n{versions}"


def _md_limitations(card: dict[str, Any]) -> str:
    n = card["dataset"]["test_examples_evaluated"]
    eps = _per255(card["threat_model"]["epsilon"])
    return "\n".join([
        "## Limitations",
        "",
        f"- Robustness was measured only against {_norm(card)} attacks with ε = {eps}, on {n} images of the test split "
        f"of `{card['dataset']['name']}`. Other threat models (L2, patches, larger ε), corruptions and distribution shift were not evaluated.",
        "- Attack accuracies are upper bounds on the true robust accuracy: a stronger or adaptive attack may lower them "
        "(AutoAttack, where reported, is the most reliable figure).",
        f"- With {n} test images, each accuracy has a standard error of up to {50 / math.sqrt(max(n, 1)):.1f} percentage points.",
        f"- Inputs must be scaled to [0, 1] at C×H×W = {_shape(card)}; changes made before that scaling (resizing, compression) "
        "are outside the threat model.",
    ])


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
