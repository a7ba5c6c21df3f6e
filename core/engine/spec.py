"""The job specification: one validated model for everything a training job needs, and the paper presets."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError


class PeerAiDWeights(BaseModel):
    """The loss weights and temperatures (paper notation), validated; the job spec's `peeraid` field.
    Defaults: the paper's CIFAR-10 values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tau: float = Field(default=5.0, gt=0, le=100, description="distillation temperature τ of the student loss")
    gamma1: float = Field(default=1.0, ge=0, le=1000, description="γ1: weight of CE(p_adv, y) in the peer loss")
    gamma2: float = Field(default=0.1, ge=0, le=1000, description="γ2: weight of the peer's re-distillation KL")
    tau_peer: float = Field(default=1.0, gt=0, le=100, description="τp: re-distillation temperature of the peer loss")
    lambda1: float = Field(default=0.0, ge=0, le=1000, description="λ1: weight of CE(s_adv, y) in the student loss")
    lambda2: float = Field(default=1.0, ge=0, le=1000, description="λ2: weight of KL(s_adv ‖ p_adv)")
    lambda3: float = Field(default=1.0, ge=0, le=1000, description="λ3: weight of KL(s_adv ‖ s_nat)")


# The paper's table; the same values for ResNet-18 and WideResNet-34-10 students.
PAPER_WEIGHTS = {
    "cifar10": PeerAiDWeights(tau=5, gamma1=1, gamma2=0.1, tau_peer=1, lambda1=0, lambda2=1, lambda3=1),
    "cifar100": PeerAiDWeights(tau=5, gamma1=1, gamma2=1, tau_peer=1, lambda1=0, lambda2=1, lambda3=1),
    "tinyimagenet": PeerAiDWeights(tau=1, gamma1=1, gamma2=100, tau_peer=1, lambda1=0.035, lambda2=35, lambda3=20),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluationSpec(_Strict):
    """The final report on the test set, for the best student and the best SWA student."""

    n_examples: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="test images to evaluate, a seeded class-stratified sample of the test split (None: the whole test split)",
    )
    pgd_steps: int = Field(default=20, ge=1, le=1000)
    autoattack: bool = Field(default=True, description="run AutoAttack (L∞; the standard version from 10 classes, adapted below)")
    autoattack_n_examples: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="run AutoAttack on a seeded class-stratified sample of this many of those images, every other attack "
        "being reported on them too (None: all)",
    )
    batch_size: int = Field(default=500, ge=1, le=8192)


class JobSpec(_Strict):
    dataset: str = Field(
        default="digits", min_length=1, max_length=512, description="built-in name, or a dataset file (the service fills this in)"
    )
    method: Literal["peeraid", "pgd_at", "trades", "natural"] = "peeraid"
    student: str = Field(default="resnet18", description="student architecture (see the registry)")
    peer: str | None = Field(default=None, description="peer architecture for PeerAiD (default: same as the student)")

    epochs: int = Field(default=300, ge=1, le=2000)
    batch_size: int = Field(default=128, ge=2, le=4096)
    lr: float = Field(default=0.1, gt=0, le=10, description="initial learning rate of the student")
    peer_lr: float | None = Field(default=None, gt=0, le=10, description="initial learning rate of the peer (default: lr)")
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=2e-4, ge=0, le=1)
    lr_decay_epochs: list[int] | list[float] = Field(
        default_factory=lambda: [214, 259, 284],
        max_length=32,
        description="where the LR is multiplied by lr_decay_factor, either as epochs (integers ≥ 1, below epochs: "
        "[214, 259, 284] decays after 214, 259 and 284 completed epochs) or as fractions of training (numbers "
        "strictly between 0 and 1, rounded to the nearest epoch: [0.7133, 0.8633, 0.9467] is the same schedule for "
        "300 epochs, and follows when epochs changes); fractions landing on one epoch each apply their factor",
    )
    lr_decay_factor: float = Field(default=0.1, gt=0, le=1)

    epsilon: float = Field(default=8 / 255, gt=0, le=0.5, description="L∞ radius, on inputs in [0, 1]")
    attack_step_size: float = Field(default=2 / 255, gt=0, le=0.5, description="α of the training and per-epoch attacks")
    attack_steps: int = Field(default=10, ge=1, le=100, description="K: attack steps during training")
    eval_pgd_steps: int = Field(default=10, ge=1, le=100, description="PGD steps of the per-epoch validation")

    peeraid: PeerAiDWeights = PeerAiDWeights()
    student_adv_forwards: Literal[1, 2] = Field(
        default=1,
        description="S(x') forwards in train mode: 2 as the script (the paper presets), 1 to save one forward "
        "(same losses and gradients; BatchNorm running statistics see x' once)",
    )
    trades_beta: float = Field(default=6.0, ge=0, le=100)

    swa: bool = Field(default=True, description="keep an SWA student from swa_start on")
    swa_start: int | float | None = Field(
        default=None,
        ge=0,
        description="first SWA epoch, as an epoch (integer ≥ 0) or a fraction of training (strictly "
        "below 1); default: the first LR decay epoch, so it follows a fractional schedule",
    )

    recalibrate_batchnorm: bool = Field(
        default=False,
        description="before each per-epoch validation, recompute the student's BatchNorm statistics with one pass over the "
        "clean training data in train mode, as the SWA student's are (the selected student keeps them): on a small dataset "
        "a few steps per epoch leave the running statistics behind the weights, and eval mode (the validation, the "
        "training attack) then falls to chance. On in the small-data preset; off in the paper presets, as the script",
    )
    augment: bool = Field(default=True, description="random crop with zero padding + horizontal flip")
    crop_padding: int = Field(default=4, ge=0, le=32)
    selection: Literal["validation", "test"] = Field(
        default="validation",
        description="where the best epoch is selected. 'validation': on val_fraction of the training data, held out "
        "(the test set serves only the final report); 'test': the paper protocol, as the authors' script: train on "
        "the whole training set and select on the test set (the report's test accuracies are then not held out)",
    )
    val_fraction: float = Field(
        default=0.1, gt=0, le=0.5, description="share of the training data held out for selection 'validation' (unused with 'test')"
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    evaluation: EvaluationSpec = EvaluationSpec()

    precision: Literal["auto", "fp32", "tf32", "bf16"] = Field(default="auto", description="auto: fp32 on CPU, tf32 on GPU")
    cuda_graph: Literal["auto", "on", "off"] = Field(
        default="auto", description="capture the training step in a CUDA graph (auto: on for GPUs)"
    )

    @field_validator("lr_decay_epochs", mode="before")
    @classmethod
    def _epochs_or_fractions(cls, value: Any) -> Any:
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            return value  # pydantic names the offending item
        if all(0 < v < 1 for v in value):
            return [float(v) for v in value]
        if all(float(v).is_integer() for v in value):
            if any(v < 1 for v in value):
                raise ValueError("decay epochs must be ≥ 1")
            return [int(v) for v in value]
        raise ValueError(
            f"each must be an epoch (an integer ≥ 1) or a fraction of training (strictly between 0 and 1), all of one kind; got {value}"
        )

    @field_validator("lr_decay_epochs")
    @classmethod
    def _increasing(cls, epochs: list[int] | list[float]) -> list[int] | list[float]:
        if any(b <= a for a, b in itertools.pairwise(epochs)):
            raise ValueError(f"must be strictly increasing, got {epochs}")
        return epochs

    @field_validator("swa_start", mode="before")
    @classmethod
    def _epoch_or_fraction(cls, value: Any) -> Any:
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise ValueError(f"give an epoch (integer) or a fraction of training (below 1), got {value}")
            return int(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        late = [e for e in self.lr_decay_epochs if isinstance(e, int) and e >= self.epochs]
        if late:
            raise ValueError(f"lr_decay_epochs {late} are not below epochs={self.epochs}; shorten the schedule with the epochs")
        if self.swa and self.resolved_swa_start >= self.epochs:
            raise ValueError(f"swa_start={self.resolved_swa_start} is not below epochs={self.epochs}; set swa_start, or swa=false")
        if self.method != "peeraid" and self.peer is not None:
            raise ValueError(f"peer is only used by method 'peeraid', not '{self.method}'; leave it out")
        return self

    @property
    def peer_architecture(self) -> str | None:
        if self.method != "peeraid":
            return None
        return self.peer or self.student

    @property
    def decay_epochs(self) -> list[int]:
        """The LR decay epochs as epochs: fractions rounded to the nearest epoch and kept within 1 … epochs − 1
        (a one-epoch run has no epoch to decay at)."""
        if not self.lr_decay_epochs or isinstance(self.lr_decay_epochs[0], int):
            return [int(e) for e in self.lr_decay_epochs]  # already ints: the validator made them so
        return [self._epoch_of(f, lowest=1) for f in self.lr_decay_epochs] if self.epochs > 1 else []

    @property
    def resolved_swa_start(self) -> int:
        if isinstance(self.swa_start, float):
            return self._epoch_of(self.swa_start, lowest=0)
        if self.swa_start is not None:
            return self.swa_start
        return self.decay_epochs[0] if self.decay_epochs else self.epochs // 2

    def _epoch_of(self, fraction: float, lowest: int) -> int:
        return max(lowest, min(math.floor(fraction * self.epochs + 0.5), self.epochs - 1))

    def lr_at(self, epoch: int, base_lr: float | None = None) -> float:
        """The step schedule: base × factor^(number of decay epochs ≤ epoch)."""
        decays = sum(1 for e in self.decay_epochs if e <= epoch)
        return (self.lr if base_lr is None else base_lr) * self.lr_decay_factor**decays


# Schedules as fractions of training, so that overriding `epochs` alone keeps them in proportion;
# at the preset's own epochs they round to the authors' decay epochs exactly.
_CIFAR = dict(epochs=300, lr_decay_epochs=[214 / 300, 259 / 300, 284 / 300], batch_size=128, lr=0.1, weight_decay=2e-4)
_TINY = dict(dataset="tinyimagenet", epochs=200, lr_decay_epochs=[99 / 200, 149 / 200], batch_size=128, lr=0.1, weight_decay=2e-4)


def _paper_preset(dataset: str, arch: str, schedule: dict[str, Any]) -> dict[str, Any]:
    return {
        **schedule,
        "dataset": dataset,
        "method": "peeraid",
        "student": arch,
        "peer": arch,
        "peeraid": PAPER_WEIGHTS[dataset].model_dump(),
        "selection": "test",
        "student_adv_forwards": 2,
    }


# Small CNNs on small data: λ1 > 0 (as the paper's TinyImageNet setting) lets the student learn labels
# while the peer is still weak.
_SMALL_CNN_WEIGHTS = PeerAiDWeights(tau=5, gamma1=1, gamma2=0.1, tau_peer=1, lambda1=0.5, lambda2=1, lambda3=1)


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits-demo": (
        "Built-in offline digits (16×16 grey), small CNN student and peer, 12 epochs: a CPU demo in about two minutes.",
        dict(
            dataset="digits",
            method="peeraid",
            student="small_cnn",
            peer="small_cnn",
            epochs=12,
            batch_size=64,
            lr=0.1,
            lr_decay_epochs=[8 / 12, 10 / 12],
            crop_padding=2,
            val_fraction=0.1,
            peeraid=_SMALL_CNN_WEIGHTS.model_dump(),
            evaluation=dict(autoattack_n_examples=50, batch_size=50),  # AutoAttack dominates the demo's time
        ),
    ),
    "small-data": (
        "Your own small dataset (a few hundred to a few thousand images, 2 or more classes): small CNN student "
        "and peer, 30 epochs of batch 64, a 5-step training attack; minutes on a CPU. Set dataset.",
        dict(
            method="peeraid",
            student="small_cnn",
            peer="small_cnn",
            epochs=30,
            batch_size=64,
            lr=0.1,
            lr_decay_epochs=[2 / 3, 5 / 6],
            attack_steps=5,
            val_fraction=0.2,
            recalibrate_batchnorm=True,  # 8-20 steps an epoch: without it, validation fell to chance at LR 0.1 (README)
            peeraid=_SMALL_CNN_WEIGHTS.model_dump(),
            evaluation=dict(batch_size=250),
        ),
    ),
    "cifar10-resnet18": ("Paper: CIFAR-10, ResNet-18 student and peer, 300 epochs.", _paper_preset("cifar10", "resnet18", _CIFAR)),
    "cifar10-wrn34-10": ("Paper: CIFAR-10, WideResNet-34-10 student and peer, 300 epochs.", _paper_preset("cifar10", "wrn34_10", _CIFAR)),
    "cifar100-resnet18": ("Paper: CIFAR-100, ResNet-18 student and peer, 300 epochs.", _paper_preset("cifar100", "resnet18", _CIFAR)),
    "cifar100-wrn34-10": (
        "Paper: CIFAR-100, WideResNet-34-10 student and peer, 300 epochs.",
        _paper_preset("cifar100", "wrn34_10", _CIFAR),
    ),
    "tinyimagenet-resnet18": (
        "Paper: TinyImageNet, ResNet-18 student and peer, 200 epochs.",
        _paper_preset("tinyimagenet", "resnet18", _TINY),
    ),
    "tinyimagenet-wrn34-10": (
        "Paper: TinyImageNet, WideResNet-34-10 student and peer; 100 epochs decayed at 49 and 79, as the authors' config.",
        _paper_preset("tinyimagenet", "wrn34_10", {**_TINY, "epochs": 100, "lr_decay_epochs": [49 / 100, 79 / 100]}),
    ),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` over `base`, nested dicts key by key (the API, the CLI and presets layer specs this way)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validation_errors(err: ValidationError) -> list[dict[str, str]]:
    errors = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown field"
        errors.append({"field": ".".join(str(p) for p in e["loc"]), "message": message})
    return errors


def build_spec(preset: str | None = None, overrides: dict[str, Any] | None = None) -> JobSpec:
    """A preset (or the defaults) with `overrides` merged in (nested dicts merge key by key), validated."""
    if preset is not None and preset not in PRESETS:
        raise SpecError([{"field": "preset", "message": f"unknown preset '{preset}'; known: {', '.join(PRESETS)}"}])
    data = merge_overrides(PRESETS[preset][1] if preset else {}, overrides or {})
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(validation_errors(err)) from None
