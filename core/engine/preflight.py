"""Before a job is queued: will it run, and what will it take.

`preflight(spec, shape)` checks the spec against its data (class count, input size against each
architecture by a dry forward on the meta device, the schedule against the epochs) and estimates
the work: arithmetic per training step counted by PyTorch's FlopCounterMode on the meta device (no
memory, no arithmetic), memory at the batch size, and hours per device class from measured rates.
A network's parameters, arithmetic and activations depend only on its architecture, classes, channels
and input size: `network_cost` measures each combination once per process, so a repeated pre-flight builds
no network.

The shapes, rates and the estimate's type are in `core.engine.estimates` (torch-free: the API reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from peeraid_models import InputTooSmallError, create_model, get_model_info, list_models
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import DatasetError, SpecError
from .estimates import DEVICE_RATES, DataShape, Estimate
from .evaluation import autoattack_work, first_pass_work
from .spec import JobSpec

BYTES_PER_VALUE = 4  # fp32 weights, gradients, momentum and activations


def forward_flops(model: nn.Module, shape: DataShape) -> tuple[float, int]:
    """Arithmetic of one image's forward pass, and the values its layers output (the activations kept for backward)."""
    activations = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal activations
        if isinstance(output, torch.Tensor):
            activations += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(torch.empty(1, shape.in_channels, shape.height, shape.width, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return float(counter.get_total_flops()), activations


@dataclass(frozen=True)
class NetworkCost:
    parameters: int
    flops: float  # one image's forward pass
    activations: int  # values its layers output for one image


@lru_cache(maxsize=512)
def network_cost(architecture: str, num_classes: int, in_channels: int, height: int, width: int) -> NetworkCost:
    """Built on the meta device and counted once per combination (an exception is not remembered)."""
    with torch.device("meta"):
        model = create_model(architecture, num_classes=num_classes, in_channels=in_channels).eval()
    flops, activations = forward_flops(model, DataShape(in_channels, height, width, num_classes, 0, 0))
    return NetworkCost(sum(p.numel() for p in model.parameters()), flops, activations)


def step_flops(spec: JobSpec, student: float, peer: float) -> float:
    """Per training image; a backward pass costs about two forwards."""
    k = spec.attack_steps
    if spec.method == "peeraid":  # peer's clean pass, K attack steps, then peer and student passes with backward
        return peer + 3 * k * student + 3 * peer + 3 * (spec.student_adv_forwards + 1) * student
    if spec.method == "trades":
        return student + 3 * k * student + 6 * student
    if spec.method == "pgd_at":
        return 3 * k * student + 3 * student
    return 3 * student


def check_architectures(spec: JobSpec) -> None:
    """SpecError naming each architecture of the spec that the models package does not have. (Checked here, where
    the networks are built, not by JobSpec: the spec is read by processes that never load the networks.)"""
    known = [m.name for m in list_models()]
    errors = [
        {"field": field, "message": f"unknown architecture '{name}'; known: {', '.join(known)}"}
        for field, name in (("student", spec.student), ("peer", spec.peer))
        if name is not None and name not in known
    ]
    if errors:
        raise SpecError(errors)


def check_fits(spec: JobSpec, shape: DataShape) -> None:
    """SpecError for an unknown architecture; DatasetError when the data cannot train this spec: classes, input
    size (a dry forward)."""
    check_architectures(spec)
    if shape.num_classes < 2:
        raise DatasetError(f"the dataset has {shape.num_classes} class; a classifier needs at least 2")
    for architecture in filter(None, (spec.student, spec.peer_architecture)):
        check_input_size(architecture, shape.height, shape.width)


def check_input_size(architecture: str, height: int, width: int) -> None:
    """The models package's InputTooSmallError as the engine's DatasetError: the data does not fit the spec
    (the API answers 422, the worker and the CLI report a dataset error)."""
    try:
        get_model_info(architecture).check_input_size(height, width)
    except InputTooSmallError as err:
        raise DatasetError(str(err)) from err


def preflight(spec: JobSpec, shape: DataShape) -> Estimate:
    check_fits(spec, shape)
    student = network_cost(spec.student, shape.num_classes, shape.in_channels, shape.height, shape.width)
    peer = (
        network_cost(spec.peer_architecture, shape.num_classes, shape.in_channels, shape.height, shape.width)
        if spec.peer_architecture
        else None
    )
    student_flops, student_activations = student.flops, student.activations
    peer_flops, peer_activations = (peer.flops, peer.activations) if peer is not None else (0.0, 0)
    per_image = step_flops(spec, student_flops, peer_flops)

    held_out = 0 if spec.selection == "test" else round(spec.val_fraction * shape.num_train)
    train = shape.num_train - held_out
    selection_images = shape.num_test if spec.selection == "test" else held_out
    swa_epochs = max(0, spec.epochs - spec.resolved_swa_start) if spec.swa else 0
    validation = selection_images * (1 + 3 * spec.eval_pgd_steps) * student_flops * (spec.epochs + swa_epochs)
    batchnorm_passes = swa_epochs + (spec.epochs if spec.recalibrate_batchnorm else 0)
    training = per_image * train * spec.epochs + validation + train * student_flops * batchnorm_passes

    ev = spec.evaluation
    n_eval = min(ev.n_examples or shape.num_test, shape.num_test)
    n_autoattack = min(ev.autoattack_n_examples or n_eval, n_eval) if ev.autoattack else 0
    passes = int(first_pass_work(n_eval, ev.pgd_steps) + autoattack_work(n_autoattack, shape.num_classes))
    models = 2 if spec.swa else 1
    evaluation = passes * student_flops * models

    parameters = [m.parameters for m in (student, peer) if m is not None]
    kept = spec.batch_size * (student_activations * (spec.student_adv_forwards + 1) + peer_activations)
    memory = (3 * sum(parameters) + kept) * BYTES_PER_VALUE + shape.num_train * shape.in_channels * shape.height * shape.width
    evaluation_hours = {
        device: rate.evaluation_seconds(spec.student, passes * models, student_flops) / 3600 for device, rate in DEVICE_RATES.items()
    }
    hours = {d: training / rate.flops_per_second(spec.student) / 3600 + evaluation_hours[d] for d, rate in DEVICE_RATES.items()}
    warnings = []
    if train < 20 * shape.num_classes:
        warnings.append(f"{train} training images for {shape.num_classes} classes is very little: expect a weak model")
    if spec.batch_size > train:
        warnings.append(f"batch_size {spec.batch_size} is larger than the {train} training images: every step sees them all")
    return Estimate(
        student_parameters=parameters[0],
        peer_parameters=parameters[1] if len(parameters) > 1 else 0,
        flops_per_training_image=per_image,
        training_flops=training,
        evaluation_flops=evaluation,
        evaluation_passes=passes,
        memory_bytes=int(memory),
        hours=hours,
        evaluation_hours=evaluation_hours,
        warnings=warnings,
    )


def device_class(device: torch.device | str) -> str:
    """The device class of DEVICE_RATES a device's work is estimated with."""
    return "cpu" if torch.device(device).type == "cpu" else "h100"
