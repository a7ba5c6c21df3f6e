"""The training loop: schedule, SWA student, per-epoch validation, best-model selection,
checkpoint after every epoch (resumable exactly), cancellation and progress callbacks.

Randomness is re-seeded from (seed, epoch) at the start of every epoch, so an epoch's result
depends only on the state at its start: resuming from the checkpoint of epoch k gives the same
parameters as never stopping."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peeraid_models import create_model
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .callbacks import EpochRecord, Stage, StepProgress, TrainingCallbacks
from .datasets import DatasetSplits
from .errors import CheckpointError, DatasetError, SpecError, TrainingCancelled, TrainingDiverged
from .evaluation import validation_metrics
from .execution import Execution, StepRunner
from .loader import BatchLoader
from .methods import PGDAT, TRADES, AttackSettings, Natural, Networks, PeerAiD, TrainingMethod
from .preflight import check_architectures, check_input_size
from .spec import JobSpec, build_spec
from .state_io import (
    load_optimizer_state,
    load_tensors,
    optimizer_state,
    prefixed,
    remove_stale_temporaries,
    save_tensors,
    unprefixed,
)

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "peeraid-service/checkpoint-v2"  # v2: epochs in history and best models are 1-based
CHECKPOINT_FORMAT_V1 = "peeraid-service/checkpoint-v1"


@dataclass
class BestModel:
    epoch: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None

    def consider(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> None:
        """`epoch` is 1-based; the later epoch wins only with a strictly higher PGD accuracy."""
        if self.state is not None and metrics["pgd_acc"] <= self.metrics["pgd_acc"]:
            return
        self.epoch, self.metrics = epoch, dict(metrics)
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def make_method(spec: JobSpec) -> TrainingMethod:
    attack = AttackSettings(spec.epsilon, spec.attack_step_size, spec.attack_steps)
    if spec.method == "peeraid":
        return PeerAiD(attack, spec.peeraid, spec.student_adv_forwards)
    if spec.method == "pgd_at":
        return PGDAT(attack)
    if spec.method == "trades":
        return TRADES(attack, spec.trades_beta)
    return Natural()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader) -> None:
    """Recompute BatchNorm running statistics with one pass in train mode, as the script's bn_update:
    a cumulative average weighted by batch size (momentum b/(seen+b)), so a partial last batch
    counts for its size. (torch's update_bn weights every batch equally.)"""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
    was_training = model.training
    model.train()
    try:
        seen = 0
        for x, _ in loader:
            for bn in norms:
                bn.momentum = len(x) / (seen + len(x))
            model(x)
            seen += len(x)
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Trainer:
    def __init__(
        self,
        spec: JobSpec,
        splits: DatasetSplits,
        *,
        workdir: Path,
        device: str | torch.device | None = None,
        callbacks: TrainingCallbacks | None = None,
        progress_interval: float = 2.0,
        eval_batch_size: int = 512,
    ):
        self.spec = spec
        self.splits = splits
        self.workdir = Path(workdir)
        self.device = resolve_device(device)
        self.callbacks = callbacks or TrainingCallbacks()
        self.progress_interval = progress_interval
        self.eval_batch_size = eval_batch_size
        if splits.selection != spec.selection:
            raise DatasetError(
                f"the splits select models on '{splits.selection}' but the spec asks for selection '{spec.selection}'; "
                "load them with load_splits(..., selection=spec.selection)"
            )
        self.method = make_method(spec)
        self.execution = Execution.resolve(spec.precision, spec.cuda_graph, self.device)
        if self.device.type == "cuda":
            self.execution.configure_backends()

        in_channels, height, width = splits.input_shape
        check_architectures(spec)
        peer_architecture = spec.peer_architecture if self.method.uses_peer else None
        for architecture in (spec.student, peer_architecture):
            if architecture is not None:
                check_input_size(architecture, height, width)
        self.model_kwargs = dict(num_classes=len(splits.classes), in_channels=in_channels)
        torch.manual_seed(spec.seed)
        student = create_model(spec.student, **self.model_kwargs).to(self.device)
        peer = create_model(peer_architecture, **self.model_kwargs).to(self.device) if peer_architecture is not None else None
        if self.execution.channels_last:
            student = student.to(memory_format=torch.channels_last)
            peer = peer.to(memory_format=torch.channels_last) if peer is not None else None
        self.nets = Networks(
            student=student,
            student_optimizer=self._sgd(student, spec.lr),
            peer=peer,
            peer_optimizer=self._sgd(peer, spec.peer_lr or spec.lr) if peer is not None else None,
        )
        self.swa: AveragedModel | None = AveragedModel(student) if spec.swa else None
        self.best_student = BestModel()
        self.best_swa = BestModel()
        self.history: list[EpochRecord] = []
        self.next_epoch = 0

        self.train_loader = BatchLoader(
            splits.train,
            spec.batch_size,
            self.device,
            train=True,
            padding=spec.crop_padding if spec.augment else 0,
            seed=spec.seed,
            channels_last=self.execution.channels_last,
        )
        self.step = StepRunner(self.method, self.nets, self.execution, self.device)
        self.checkpoint_path = self.workdir / CHECKPOINT_NAME
        remove_stale_temporaries(self.workdir)
        if self.checkpoint_path.exists():
            self.load_checkpoint()

    def execution_report(self) -> dict[str, Any]:
        """How the training steps ran: device, precision, memory format, CUDA graph or eager, and why it fell back."""
        return {"device": str(self.device), **self.step.report()}

    def _sgd(self, model: nn.Module, lr: float) -> torch.optim.SGD:
        s = self.spec
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)

    # --- the loop ------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.next_epoch >= self.spec.epochs

    def fit(self) -> list[EpochRecord]:
        self.callbacks.on_stage(Stage.TRAINING, f"training from epoch {self.next_epoch + 1} of {self.spec.epochs}")
        while not self.finished:
            self.run_epoch(self.next_epoch)
        return self.history

    def set_lr(self, epoch: int) -> float:
        s = self.spec
        lr = s.lr_at(epoch)
        for group in self.nets.student_optimizer.param_groups:
            group["lr"] = lr
        if self.nets.peer_optimizer is not None:
            for group in self.nets.peer_optimizer.param_groups:
                group["lr"] = s.lr_at(epoch, s.peer_lr or s.lr)
        return lr

    def run_epoch(self, epoch: int) -> EpochRecord:
        """Train epoch index `epoch` (0-based, as the schedule counts); events and records number it epoch + 1."""
        s = self.spec
        torch.manual_seed(epoch_seed(s.seed, epoch))
        lr = self.set_lr(epoch)
        self.train_loader.set_epoch(epoch)
        steps = len(self.train_loader)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        started = last_report = time.perf_counter()
        for step, (x, y) in enumerate(self.train_loader):
            if self.callbacks.should_stop():
                raise TrainingCancelled(f"cancelled during epoch {epoch + 1}")
            step_losses = self.step(x, y)
            for name, value in step_losses.items():
                sums[name] = sums.get(name, 0) + value * len(y)
            seen += len(y)
            now = time.perf_counter()
            if now - last_report >= self.progress_interval or step == steps - 1:
                last_report = now
                means = self._finite_means(sums, seen, epoch)
                self.callbacks.on_step(StepProgress(epoch + 1, s.epochs, step + 1, steps, seen / (now - started), lr, means))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = time.perf_counter() - started
        losses = self._finite_means(sums, seen, epoch)

        eval_started = time.perf_counter()
        if s.recalibrate_batchnorm:
            self.train_loader.set_epoch(self.bn_pass_epoch(epoch))
            recalibrate_batchnorm(self.nets.student, self.train_loader)
        swa = self.swa if self.swa is not None and epoch >= s.resolved_swa_start else None
        if swa is not None:
            swa.update_parameters(self.nets.student)
            self.train_loader.set_epoch(self.bn_pass_epoch(epoch))
            recalibrate_batchnorm(swa.module, self.train_loader)
        student_metrics = self._validate(self.nets.student)
        self.best_student.consider(epoch + 1, student_metrics, self.nets.student)
        swa_metrics = None
        if swa is not None:
            swa_metrics = self._validate(swa.module)
            self.best_swa.consider(epoch + 1, swa_metrics, swa.module)
        record = EpochRecord(
            epoch=epoch + 1,
            lr=lr,
            train_seconds=train_seconds,
            eval_seconds=time.perf_counter() - eval_started,
            images_per_sec=seen / train_seconds,
            losses=losses,
            student=student_metrics,
            swa_student=swa_metrics,
            best={
                key: {"epoch": b.epoch, **b.metrics}
                for key, b in (("student", self.best_student), ("swa_student", self.best_swa))
                if b.state is not None
            },
        )
        self.history.append(record)
        self.next_epoch = epoch + 1
        self.save_checkpoint()
        self.callbacks.on_epoch(record)
        return record

    @staticmethod
    def bn_pass_epoch(epoch: int) -> int:
        """The loader epoch whose shuffle and augmentation the BatchNorm passes after `epoch` use."""
        return 10_000_019 + epoch

    def _finite_means(self, sums: dict[str, torch.Tensor], seen: int, epoch: int) -> dict[str, float]:
        """`epoch` is the 0-based index run_epoch takes; the message numbers it from 1, as users count."""
        means = {name: (total / seen).item() for name, total in sums.items()}
        bad = [name for name, value in means.items() if not math.isfinite(value)]
        if bad:
            raise TrainingDiverged(f"{', '.join(bad)} became non-finite in epoch {epoch + 1}; training diverged")
        return means

    def _validate(self, model: nn.Module) -> dict[str, float]:
        s = self.spec
        return validation_metrics(
            model,
            self.splits.val,
            epsilon=s.epsilon,
            step_size=s.attack_step_size,
            steps=s.eval_pgd_steps,
            batch_size=self.eval_batch_size,
            device=self.device,
        )

    # --- checkpoint ----------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        tensors = prefixed("student", self.nets.student.state_dict())
        opt_tensors, opt_meta = optimizer_state("opt.student", self.nets.student_optimizer)
        tensors.update(opt_tensors)
        meta: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "spec": self.spec.model_dump(mode="json"),
            "dataset_fingerprint": self.splits.fingerprint,
            "next_epoch": self.next_epoch,
            "history": [r.to_dict() for r in self.history],
            "opt.student": opt_meta,
        }
        if self.nets.peer is not None:
            assert self.nets.peer_optimizer is not None  # the trainer builds the peer with its optimizer
            tensors.update(prefixed("peer", self.nets.peer.state_dict()))
            opt_tensors, meta["opt.peer"] = optimizer_state("opt.peer", self.nets.peer_optimizer)
            tensors.update(opt_tensors)
        if self.swa is not None:
            tensors.update(prefixed("swa", self.swa.state_dict()))
        for name, best in (("best_student", self.best_student), ("best_swa", self.best_swa)):
            if best.state is not None:
                tensors.update(prefixed(name, best.state))
                meta[name] = {"epoch": best.epoch, "metrics": best.metrics}
        save_tensors(self.checkpoint_path, tensors, meta)

    def load_checkpoint(self) -> None:
        tensors, meta = read_checkpoint(self.checkpoint_path)
        if not self.splits.matches(meta["dataset_fingerprint"]):
            raise CheckpointError(f"{self.checkpoint_path} was written for a different dataset")
        if _stored_spec(meta["spec"]) != self.spec:
            raise CheckpointError(f"{self.checkpoint_path} was written for a different job spec")
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        self.nets.student.load_state_dict(unprefixed("student", tensors))
        load_optimizer_state("opt.student", self.nets.student_optimizer, tensors, meta["opt.student"])
        if self.nets.peer is not None:
            assert self.nets.peer_optimizer is not None  # the trainer builds the peer with its optimizer
            self.nets.peer.load_state_dict(unprefixed("peer", tensors))
            load_optimizer_state("opt.peer", self.nets.peer_optimizer, tensors, meta["opt.peer"])
        if self.swa is not None:
            self.swa.load_state_dict(unprefixed("swa", tensors))
        for name, best in (("best_student", self.best_student), ("best_swa", self.best_swa)):
            if name in meta:
                best.epoch, best.metrics = meta[name]["epoch"], meta[name]["metrics"]
                best.state = {k: v.cpu() for k, v in unprefixed(name, tensors).items()}
        self.history = [EpochRecord(**r) for r in meta["history"]]
        self.next_epoch = meta["next_epoch"]
        self.callbacks.on_resume(self.history)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A training checkpoint's tensors and metadata, as this version writes them: a v1 checkpoint (0-based
    epochs) is upgraded, so that a job checkpointed before the change both resumes and exports its students.
    CheckpointError for a file of any other format."""
    tensors, meta = load_tensors(path)
    if meta.get("format") == CHECKPOINT_FORMAT_V1:
        meta = _upgrade_v1(meta)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this version (format {meta.get('format')!r})")
    return tensors, meta


def _stored_spec(data: dict[str, Any]) -> JobSpec | None:
    """A checkpoint's spec as this version reads it: fields added since take their defaults."""
    try:
        return build_spec(None, data)
    except SpecError:
        return None


def _upgrade_v1(meta: dict[str, Any]) -> dict[str, Any]:
    """A v1 checkpoint (0-based epochs) as v2, so jobs checkpointed before the change resume and export."""
    meta = {**meta, "format": CHECKPOINT_FORMAT}
    meta["history"] = [_shift_epochs(r) for r in meta["history"]]
    for name in ("best_student", "best_swa"):
        if name in meta:
            meta[name] = {**meta[name], "epoch": meta[name]["epoch"] + 1}
    return meta


def _shift_epochs(record: dict[str, Any]) -> dict[str, Any]:
    best = {key: {**b, "epoch": b["epoch"] + 1} for key, b in (record.get("best") or {}).items()} or record.get("best")
    return {**record, "epoch": record["epoch"] + 1, "best": best}
