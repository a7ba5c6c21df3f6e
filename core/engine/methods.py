"""Training methods under one interface: one call of `step` is one optimisation step on a batch.

Steps return their losses as detached tensors and never synchronise with the host (no
`.item()`), so the same code runs eagerly or captured in a CUDA graph."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import kl_attack, pgd
from .losses import peer_loss, student_loss, trades_loss
from .spec import PeerAiDWeights


@dataclass(frozen=True)
class AttackSettings:
    epsilon: float
    step_size: float
    steps: int


@dataclass
class Networks:
    student: nn.Module
    student_optimizer: torch.optim.Optimizer
    peer: nn.Module | None = None
    peer_optimizer: torch.optim.Optimizer | None = None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.student_optimizer, self.peer_optimizer) if o is not None]

    def zero_grad(self) -> None:
        for optimizer in self.optimizers():
            optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        for optimizer in self.optimizers():
            optimizer.step()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block, back in its previous mode after it, even on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class TrainingMethod(abc.ABC):
    name: ClassVar[str]
    uses_peer: ClassVar[bool] = False

    @abc.abstractmethod
    def step(self, nets: Networks, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on (x, y); leaves the networks in train mode."""


@dataclass(frozen=True)
class PeerAiD(TrainingMethod):
    """Jung et al., CVPR 2024: student and peer trained together on the student's adversarial examples.

    `student_adv_forwards=2` reproduces the script exactly: it evaluates S(x') twice in train mode,
    so BatchNorm running statistics see x' twice. With 1 (the default) S(x') is computed once;
    losses and gradients are identical, only those running statistics differ."""

    attack: AttackSettings
    weights: PeerAiDWeights
    student_adv_forwards: int = 1
    name: ClassVar[str] = "peeraid"
    uses_peer: ClassVar[bool] = True

    def step(self, nets: Networks, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        student, peer = nets.student, nets.peer
        assert peer is not None, "PeerAiD trains a peer beside the student; Networks.peer is None"
        with eval_mode(peer), torch.no_grad():
            peer_clean_probs = F.softmax(peer(x), dim=1)
        a = self.attack
        with eval_mode(student):
            x_adv = kl_attack(student, x, peer_clean_probs, epsilon=a.epsilon, step_size=a.step_size, steps=a.steps)

        student.train()
        peer.train()
        nets.zero_grad()
        p_adv = peer(x_adv)
        s_adv_for_peer = student(x_adv)
        s_adv = student(x_adv) if self.student_adv_forwards == 2 else s_adv_for_peer
        s_nat = student(x)
        loss_peer = peer_loss(p_adv, s_adv_for_peer, y, self.weights)
        loss_student = student_loss(s_adv, p_adv, s_nat, y, self.weights)
        (loss_peer + loss_student).backward()
        nets.optimizer_step()
        return {
            "loss_student": loss_student.detach(),
            "loss_peer": loss_peer.detach(),
            "train_student_adv_acc": (s_adv.argmax(1) == y).float().mean().detach(),
            "train_peer_adv_acc": (p_adv.argmax(1) == y).float().mean().detach(),
        }


@dataclass(frozen=True)
class PGDAT(TrainingMethod):
    """Madry et al. 2018: cross-entropy on PGD examples (attacked in eval mode, as the reference script does)."""

    attack: AttackSettings
    name: ClassVar[str] = "pgd_at"

    def step(self, nets: Networks, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        student = nets.student
        a = self.attack
        with eval_mode(student):
            x_adv = pgd(student, x, y, epsilon=a.epsilon, step_size=a.step_size, steps=a.steps)
        student.train()
        nets.zero_grad()
        s_adv = student(x_adv)
        loss = F.cross_entropy(s_adv, y)
        loss.backward()
        nets.optimizer_step()
        return {"loss_student": loss.detach(), "train_student_adv_acc": (s_adv.argmax(1) == y).float().mean().detach()}


@dataclass(frozen=True)
class TRADES(TrainingMethod):
    """Zhang et al. 2019: KL inner maximisation from x + 0.001·N(0, I), then CE + β·KL."""

    attack: AttackSettings
    beta: float = 6.0
    name: ClassVar[str] = "trades"

    def step(self, nets: Networks, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        student = nets.student
        a = self.attack
        with eval_mode(student):
            with torch.no_grad():
                clean_probs = F.softmax(student(x), dim=1)
            x_adv = kl_attack(student, x, clean_probs, epsilon=a.epsilon, step_size=a.step_size, steps=a.steps)
        student.train()
        nets.zero_grad()
        s_nat = student(x)
        s_adv = student(x_adv)
        loss = trades_loss(s_adv, s_nat, y, self.beta)
        loss.backward()
        nets.optimizer_step()
        return {"loss_student": loss.detach(), "train_student_adv_acc": (s_adv.argmax(1) == y).float().mean().detach()}


@dataclass(frozen=True)
class Natural(TrainingMethod):
    """Standard training on clean inputs: the non-robust baseline."""

    name: ClassVar[str] = "natural"

    def step(self, nets: Networks, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        student = nets.student
        student.train()
        nets.zero_grad()
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        nets.optimizer_step()
        return {"loss_student": loss.detach(), "train_student_clean_acc": (logits.argmax(1) == y).float().mean().detach()}
