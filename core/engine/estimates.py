"""What a pre-flight tells, torch-free (the API reads it; `core.engine.preflight` computes it): the shape of a job's
data, the rates of each device class, and the estimate.

Rates are measured throughputs turned into arithmetic per second (per architecture where measured: small
networks use the arithmetic units far less well than large ones), with `python -m bench.preflight`, which prints
each case's measured and estimated times side by side; the README's Performance section gives the measurements.
AutoAttack's work is counted for a model about as robust as bench.preflight's digits job, and scales with the
number of target classes (`evaluation.autoattack_work`); dataset loading and the last, smaller batch of each
epoch are not counted."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .datasets import DatasetSplits


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
