"""Before a job is queued: will it run, and what will it take.

`preflight(spec, shape)` checks the spec against its data (class count, input size against each
architecture by a dry forward on the meta device, the schedule against the epochs) and estimates
the work: arithmetic per training step counted by PyTorch's FlopCounterMode on the meta device (no
memory, no arithmetic), memory at the batch size, and hours per device class from measured rates.
A network's parameters, arithmetic and activations depend only on its architecture, classes, channels
and input size: `network_cost` measures each combination once per process (building and counting a
WRN-70-16 takes 0.1-0.3 s of CPU; a pre-flight whose networks are counted already, about 10 µs).

Rates are measured throughputs, turned into arithmetic per second:
- h100: the authors' step (ResNet-18 student and peer, CIFAR-100, batch 128, eager, TF32) ran at
  1,157 images/s on one H100 (../shared/PEERAID_SPEC.md); the fast paths here aim higher, so GPU
  estimates are upper bounds.
- cpu: whole jobs on this project's 2-core machine with one torch thread, as the embedded service's
  worker runs (`python -m bench.preflight --threads 1`, 2026-12-02, an ordinary day): training reached
  60 GFLOP/s with small_cnn (at 1×16×16 and at 3×32×32 alike) and 230 with ResNet-18 at 3×32×32;
  architectures not measured get half of ResNet-18's. The final evaluation of small_cnn reached 22 GFLOP/s
  at 1×16×16 and 42 at 3×32×32: AutoAttack's many small batches cost about 2 MFLOP-equivalents of
  overhead per image and pass, whatever the network (`evaluation_overhead_flops`), which only small
  networks notice. (On 2026-11-26, with two threads on a loaded machine, the same jobs ran 3.5× slower:
  one thread is also the steadier choice on a shared host.)
AutoAttack's work is counted as for a model of the robustness of bench.preflight's digits job, and
scales with the number of target classes (`evaluation.autoattack_work`): a robust model takes longer,
one with little robustness is broken early and finishes sooner (ResNet-18 after one epoch took a tenth
of its estimate). Small networks use the arithmetic units far less well than large ones, hence rates
per architecture where measured; dataset loading and the last, smaller batch of each epoch are not
counted. `python -m bench.preflight` prints each case's measured and estimated times side by side."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
from peeraid_models import InputTooSmallError, create_model, get_model_info, list_models
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .datasets import DatasetSplits
from .errors import DatasetError, SpecError
from .evaluation import autoattack_work, first_pass_work
from .spec import JobSpec

BYTES_PER_VALUE = 4  # fp32 weights, gradients, momentum and activations


@dataclass(frozen=True)
class DataShape:
    in_channels: int
    height: int
    width: int
    num_classes: int
    num_train: int  # the training data before a validation split is held out of it
    num_test: int

    @classmethod
    def of(cls, splits: DatasetSplits) -> DataShape:
        """The shape of the data a job was given (its validation split counted back into the training data)."""
        c, h, w = splits.input_shape
        held_out = 0 if splits.selection == "test" else len(splits.val)
        return cls(c, h, w, len(splits.classes), len(splits.train) + held_out, len(splits.test))


@dataclass(frozen=True)
class DeviceRate:
    """Arithmetic per second a device class reaches, by architecture where measured; the final
    evaluation's own rate where it was measured apart from training."""

    default: float
    by_architecture: dict[str, float] = field(default_factory=dict)
    evaluation_by_architecture: dict[str, float] = field(default_factory=dict)
    evaluation_overhead_flops: float = 0.0  # per image and forward pass of the final evaluation, in FLOP-equivalents
    source: str = ""

    def flops_per_second(self, architecture: str) -> float:
        return self.by_architecture.get(architecture, self.default)

    def evaluation_flops_per_second(self, architecture: str) -> float:
        return self.evaluation_by_architecture.get(architecture, self.flops_per_second(architecture))

    def evaluation_seconds(self, architecture: str, passes: float, flops_per_pass: float) -> float:
        return passes * (flops_per_pass + self.evaluation_overhead_flops) / self.evaluation_flops_per_second(architecture)


DEVICE_RATES: dict[str, DeviceRate] = {
    "h100": DeviceRate(55.3e12, source="authors' eager TF32 step, ResNet-18, 1,157 images/s on one H100"),
    "cpu": DeviceRate(
        115e9,
        {"small_cnn": 60e9, "resnet18": 230e9},
        {"small_cnn": 57e9},
        evaluation_overhead_flops=2.0e6,
        source="whole jobs on a 2-core CPU, one torch thread (bench.preflight --threads 1)",
    ),
}


# The built-in datasets' shapes (as core.engine.sources loads them; a test keeps them in step).
BUILTIN_SHAPES = {
    "digits": DataShape(1, 16, 16, 10, 1438, 359),
    "cifar10": DataShape(3, 32, 32, 10, 50_000, 10_000),
    "cifar100": DataShape(3, 32, 32, 100, 50_000, 10_000),
    "tinyimagenet": DataShape(3, 64, 64, 200, 100_000, 10_000),
}


@dataclass
class Estimate:
    student_parameters: int
    peer_parameters: int
    flops_per_training_image: float
    training_flops: float
    evaluation_flops: float
    evaluation_passes: int  # forward-equivalent passes of the final report, per model
    memory_bytes: int  # at the batch size: weights, gradients and momentum of both networks, activations, the data
    hours: dict[str, float]  # per device class
    evaluation_hours: dict[str, float]  # of those, the final evaluation's
    warnings: list[str]

    def evaluation_share(self, device_class: str) -> float:
        """The part of the job's time its final evaluation is expected to take on this device class."""
        return self.evaluation_hours[device_class] / self.hours[device_class] if self.hours[device_class] > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
