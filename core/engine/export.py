"""Portable weights (safetensors, never pickle), ONNX files and torch.export programs.

A weights file carries its architecture in the safetensors header, so `load_model(path)`
rebuilds the network without any other file (timm-style portable checkpoints). ONNX files and
torch.export programs load without this package (onnxruntime; PyTorch alone) and are checked against
the PyTorch model's logits before they are kept."""

from __future__ import annotations

import copy
import json
import platform
import warnings
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import peeraid_models
import torch
from torch import nn

from .errors import CheckpointError, ExportError
from .state_io import atomic_write, save_tensors

ONNX_OPSET = 17
VERIFY_ATOL = 1e-4  # max |logit difference| allowed between an export and the fp32 PyTorch model
VERIFY_BATCH_SIZES = (1, 8)


def save_weights(model: nn.Module, path: Path, *, architecture: str, num_classes: int, input_shape, classes: list[str]) -> None:
    in_channels, height, _width = input_shape
    save_tensors(
        path,
        model.state_dict(),
        {
            "format": peeraid_models.WEIGHTS_FORMAT,
            "architecture": architecture,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": height,
            "classes": classes,
        },
    )


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a weights file describes and load it (strict), in eval mode: `peeraid_models.load_model`,
    whose errors, and a file that cannot be read, are the engine's CheckpointError."""
    try:
        return peeraid_models.load_model(path, device)
    except (peeraid_models.WeightsError, OSError) as err:
        raise CheckpointError(str(err)) from err  # each message names the file


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


# --- ONNX and torch.export programs -------------------------------------------------------


def export_program(model: nn.Module, path: Path, input_shape) -> Path:
    """A torch.export program of the eval-mode model (`torch.export.save`, .pt2), any batch size; verified
    before it is kept. It loads with PyTorch alone: `torch.export.load(path).module()`."""
    model = _cpu_eval(model)

    def write(tmp: Path) -> None:
        # an example batch of 2: a batch of 1 would let the exporter specialise the batch dimension to 1
        program = torch.export.export(
            model, (_probe(2, seed=1, input_shape=input_shape),), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
        with open(tmp, "wb") as f:  # a file object: given a path, torch.export wants it to end in .pt2, and tmp does not
            torch.export.save(program, f)
        verify_program(tmp, model, input_shape)

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
                model,
                (_probe(1, seed=1, input_shape=input_shape),),
                str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                opset_version=ONNX_OPSET,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        verify_onnx(tmp, model, input_shape)

    atomic_write(path, write)
    return Path(path)


def verify_program(path: Path, model: nn.Module, input_shape) -> None:
    """Raise ExportError unless the torch.export program reproduces the model's logits at batch 1 and 8."""
    try:
        with open(path, "rb") as f:
            loaded = torch.export.load(f).module()
    except Exception as err:
        raise ExportError(f"cannot load torch.export program {path}: {err}") from err
    _compare_logits("torch.export", loaded, _cpu_eval(model), input_shape)


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
    run = lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
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
    if not any(m.training for m in model.modules()) and all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors
    ):
        return model
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


@contextmanager
def _quiet_deprecations():
    # the legacy ONNX exporter warns on every call that it is deprecated; we chose it knowingly
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield
