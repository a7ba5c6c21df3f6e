"""The job specification: one validated model for everything a training job needs, and the paper presets."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError
from .losses import PAPER_WEIGHTS, PeerAiDWeights
from .models import list_models

METHODS = ("peeraid", "pgd_at", "trades", "natural")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluationSpec(_Strict):
    """The final report on the test set, for the best student and the best SWA student."""

    n_examples: int | None = Field(
        None, ge=1, le=1_000_000, description="test examples to attack (None: the whole test set)"
    )
    pgd_steps: int = Field(20, ge=1, le=1000)
    autoattack: bool = Field(True, description="run AutoAttack (standard version, L∞)")
    batch_size: int = Field(500, ge=1, le=8192)


class JobSpec(_Strict):
    dataset: str = Field("digits", min_length=1, max_length=512, description="built-in name, or a dataset file (the service fills this in)")
    method: Literal["peeraid", "pgd_at", "trades", "natural"] = "peeraid"
    student: str = Field("resnet18", description="student architecture (see the registry)")
    peer: str | None = Field(None, description="peer architecture for PeerAiD (default: same as the student)")

    epochs: int = Field(300, ge=1, le=2000)
    batch_size: int = Field(128, ge=2, le=4096)
    lr: float = Field(0.1, gt=0, le=10, description="initial learning rate of the student")
    peer_lr: float | None = Field(None, gt=0, le=10, description="initial learning rate of the peer (default: lr)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(2e-4, ge=0, le=1)
    lr_decay_epochs: list[int] = Field(default_factory=lambda: [214, 259, 284], max_length=32)
    lr_decay_factor: float = Field(0.1, gt=0, le=1)

    epsilon: float = Field(8 / 255, gt=0, le=0.5, description="L∞ radius, on inputs in [0, 1]")
    attack_step_size: float = Field(2 / 255, gt=0, le=0.5, description="α of the training and per-epoch attacks")
    attack_steps: int = Field(10, ge=1, le=100, description="K: attack steps during training")
    eval_pgd_steps: int = Field(10, ge=1, le=100, description="PGD steps of the per-epoch validation")

    peeraid: PeerAiDWeights = PeerAiDWeights()
    student_adv_forwards: Literal[1, 2] = Field(
        1, description="S(x') forwards in train mode: 2 as the script (the paper presets), 1 to save one forward "
        "(same losses and gradients; BatchNorm running statistics see x' once)"
    )
    trades_beta: float = Field(6.0, ge=0, le=100)

    swa: bool = Field(True, description="keep an SWA student from swa_start on")
    swa_start: int | None = Field(None, ge=0, description="first SWA epoch (default: the first LR decay epoch)")

    augment: bool = Field(True, description="random crop with zero padding + horizontal flip")
    crop_padding: int = Field(4, ge=0, le=32)
    selection: Literal["validation", "test"] = Field(
        "validation",
        description="where the best epoch is selected. 'validation': on val_fraction of the training data, held out "
        "(the test set serves only the final report); 'test': the paper protocol, as the authors' script: train on "
        "the whole training set and select on the test set (the report's test accuracies are then not held out)",
    )
    val_fraction: float = Field(
        0.1, gt=0, le=0.5, description="share of the training data held out for selection 'validation' (unused with 'test')"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)

    evaluation: EvaluationSpec = EvaluationSpec()

    precision: Literal["auto", "fp32", "tf32", "bf16"] = Field(
        "auto", description="auto: fp32 on CPU, tf32 on GPU"
    )
    cuda_graph: Literal["auto", "on", "off"] = Field(
        "auto", description="capture the training step in a CUDA graph (auto: on for GPUs)"
    )

    @field_validator("student", "peer")
    @classmethod
    def _known_architecture(cls, name: str | None) -> str | None:
        known = [m.name for m in list_models()]
        if name is not None and name not in known:
            raise ValueError(f"unknown architecture '{name}'; known: {', '.join(known)}")
        return name

    @field_validator("lr_decay_epochs")
    @classmethod
    def _increasing(cls, epochs: list[int]) -> list[int]:
        if any(e < 1 for e in epochs):
            raise ValueError("decay epochs must be ≥ 1")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"must be strictly increasing, got {epochs}")
        return epochs

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        late = [e for e in self.lr_decay_epochs if e >= self.epochs]
        if late:
            raise ValueError(
                f"lr_decay_epochs {late} are not below epochs={self.epochs}; shorten the schedule with the epochs"
            )
        if self.swa and self.resolved_swa_start >= self.epochs:
            raise ValueError(
                f"swa_start={self.resolved_swa_start} is not below epochs={self.epochs}; set swa_start, or swa=false"
            )
        if self.method != "peeraid" and self.peer is not None:
            raise ValueError(f"peer is only used by method 'peeraid', not '{self.method}'; leave it out")
        return self

    @property
    def peer_architecture(self) -> str | None:
        if self.method != "peeraid":
            return None
        return self.peer or self.student

    @property
    def resolved_swa_start(self) -> int:
        if self.swa_start is not None:
            return self.swa_start
        return self.lr_decay_epochs[0] if self.lr_decay_epochs else self.epochs // 2

    def lr_at(self, epoch: int, base_lr: float | None = None) -> float:
        """The step schedule: base × factor^(number of decay epochs ≤ epoch)."""
        decays = sum(1 for e in self.lr_decay_epochs if e <= epoch)
        return (self.lr if base_lr is None else base_lr) * self.lr_decay_factor**decays


_CIFAR = dict(epochs=300, lr_decay_epochs=[214, 259, 284], batch_size=128, lr=0.1, weight_decay=2e-4)
_TINY = dict(dataset="tinyimagenet", epochs=200, lr_decay_epochs=[99, 149], batch_size=128, lr=0.1, weight_decay=2e-4)


def _paper_preset(dataset: str, arch: str, schedule: dict[str, Any]) -> dict[str, Any]:
    return {
        **schedule, "dataset": dataset, "method": "peeraid", "student": arch, "peer": arch,
        "peeraid": PAPER_WEIGHTS[dataset].model_dump(), "selection": "test", "student_adv_forwards": 2,
    }


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits-demo": (
        "Built-in offline digits (16×16 grey), small CNN student and peer, 12 epochs: a CPU demo in about two minutes.",
        dict(
            dataset="digits", method="peeraid", student="small_cnn", peer="small_cnn", epochs=12, batch_size=64,
            lr=0.1, lr_decay_epochs=[8, 10], crop_padding=2, val_fraction=0.1,
            # λ1 > 0 (as the paper's TinyImageNet setting) lets the student learn labels while the peer is still weak
            peeraid=dict(tau=5, gamma1=1, gamma2=0.1, tau_peer=1, lambda1=0.5, lambda2=1, lambda3=1),
            evaluation=dict(n_examples=100, batch_size=100),
        ),
    ),
    "cifar10-resnet18": ("Paper: CIFAR-10, ResNet-18 student and peer, 300 epochs.", _paper_preset("cifar10", "resnet18", _CIFAR)),
    "cifar10-wrn34-10": ("Paper: CIFAR-10, WideResNet-34-10 student and peer, 300 epochs.", _paper_preset("cifar10", "wrn34_10", _CIFAR)),
    "cifar100-resnet18": ("Paper: CIFAR-100, ResNet-18 student and peer, 300 epochs.", _paper_preset("cifar100", "resnet18", _CIFAR)),
    "cifar100-wrn34-10": ("Paper: CIFAR-100, WideResNet-34-10 student and peer, 300 epochs.", _paper_preset("cifar100", "wrn34_10", _CIFAR)),
    "tinyimagenet-resnet18": ("Paper: TinyImageNet, ResNet-18 student and peer, 200 epochs.", _paper_preset("tinyimagenet", "resnet18", _TINY)),
    "tinyimagenet-wrn34-10": (
        "Paper: TinyImageNet, WideResNet-34-10 student and peer; 100 epochs decayed at 49 and 79, as the authors' config.",
        _paper_preset("tinyimagenet", "wrn34_10", {**_TINY, "epochs": 100, "lr_decay_epochs": [49, 79]}),
    ),
}


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
