"""L∞ attacks. Each returns a detached batch inside the ε-ball around x and inside [0, 1]; and the
AutoAttack ensemble (pyautoattack) configured for any number of classes from 2.

The caller chooses the model's mode (the reference script attacks in eval mode)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack_targeted
from torch import nn


def project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0, 1)


def _ascend(model: nn.Module, x_adv: torch.Tensor, loss_fn) -> torch.Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x_adv))
        (grad,) = torch.autograd.grad(loss, x_adv)
    return grad.sign()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
) -> torch.Tensor:
    """PGD-k on cross-entropy with a uniform random start in the ε-ball (Madry et al.). As the authors'
    LinfPGDAttack, the start itself is not clipped to [0, 1]; every step's result is."""
    x = x.detach()
    # noise drawn in logical (NCHW) order, so the same seed gives the same start in any memory format
    noise = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    x_adv = x + noise.uniform_(-epsilon, epsilon) if random_start and steps > 0 else x
    for _ in range(steps):
        step = _ascend(model, x_adv, lambda logits: F.cross_entropy(logits, y))
        x_adv = project(x_adv.detach() + step_size * step, x, epsilon)
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """One signed-gradient step of size ε from x."""
    step = _ascend(model, x, lambda logits: F.cross_entropy(logits, y))
    return project(x.detach() + epsilon * step, x.detach(), epsilon).detach()


def kl_attack(
    model: nn.Module,
    x: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    init_std: float = 0.001,
) -> torch.Tensor:
    """Maximise Σ KL(target ‖ softmax(model(x'))) from x + init_std·N(0, I).

    With target = softmax(peer(x)) this is PeerAiD's training attack; with the model's own clean
    prediction it is TRADES' inner maximisation."""
    x = x.detach()
    target_probs = target_probs.detach()
    x_adv = x + init_std * torch.randn(x.shape, device=x.device, dtype=x.dtype)
    for _ in range(steps):
        step = _ascend(model, x_adv, lambda logits: F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum"))
        x_adv = project(x_adv.detach() + step_size * step, x, epsilon)
    return x_adv.detach()


# --- AutoAttack (Croce & Hein, 2020), with pyautoattack's own attacks ------------------------

STANDARD_TARGET_CLASSES = 9
SQUARE_QUERIES = 5000


class _TargetedCrossEntropyAPGD(APGDAttack_targeted):
    """pyautoattack's APGD-T on its own targeted cross-entropy loss (`ce_loss_targeted`) instead of the
    targeted DLR loss, which reads the 3rd and 4th largest logits and so needs 4 classes. (Its perturb()
    accepts only loss="dlr-targeted", so the loss is swapped under that name.)"""

    def dlr_loss_targeted(self, x, y):
        return self.ce_loss_targeted(x, y)


@dataclass(frozen=True)
class AutoAttackSet:
    """The AutoAttack ensemble for `num_classes` classes: the standard version (APGD-CE, APGD-T with the
    targeted DLR loss, FAB-T, Square) wherever the class count allows, with at most C − 1 target classes.

    Below 4 classes the targeted DLR loss is undefined (it reads the 4th largest logit), so APGD-T runs
    on the targeted cross-entropy loss instead; with 3 classes the untargeted DLR loss still exists and
    APGD-DLR joins. With 2 classes the only target is the other class, and targeted cross-entropy
    then follows the same sign gradient as APGD-CE: in effect a second APGD-CE restart."""

    num_classes: int

    @property
    def target_classes(self) -> int:
        return min(STANDARD_TARGET_CLASSES, self.num_classes - 1)

    @property
    def targeted_loss(self) -> str:
        return "dlr" if self.num_classes >= 4 else "ce"

    @property
    def attacks(self) -> tuple[str, ...]:
        untargeted_dlr = ("apgd-dlr",) if self.num_classes == 3 else ()
        return ("apgd-ce", *untargeted_dlr, "apgd-t", "fab-t", "square")

    @property
    def version(self) -> str:
        """pyautoattack's name for it: "standard" from 4 classes on (with fewer targets below 10), else "custom"."""
        return "standard" if self.targeted_loss == "dlr" else "custom"

    def describe(self) -> str:
        t = self.target_classes
        targets = f"{t} target class{'es' if t > 1 else ''}"
        apgd_t = f"APGD-T ({targets})" if self.targeted_loss == "dlr" else f"APGD-T on the targeted cross-entropy loss ({targets})"
        listed = ", ".join(
            {
                "apgd-ce": "APGD-CE",
                "apgd-dlr": "APGD-DLR",
                "apgd-t": apgd_t,
                "fab-t": f"FAB-T ({targets})",
                "square": f"Square ({SQUARE_QUERIES} queries)",
            }[a]
            for a in self.attacks
        )
        if self.num_classes > STANDARD_TARGET_CLASSES:
            return f"standard version, L∞: {listed}"
        if self.targeted_loss == "dlr":
            return f"standard version, L∞, with all {t} other classes as targets (its 9 need 10 classes): {listed}"
        needs = "the DLR losses need 3 classes or more" if self.num_classes == 2 else "the targeted DLR loss needs 4 classes"
        return f"adapted to {self.num_classes} classes ({needs}), L∞: {listed}"

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "attacks": list(self.attacks),
            "target_classes": self.target_classes,
            "targeted_loss": self.targeted_loss,
            "description": self.describe(),
        }


# pyautoattack's class-count check warns that the DLR losses need more classes whenever APGD-T runs,
# even with the loss swapped; adapted sets log through this child logger, which drops that warning.
_ADAPTED_LOG = logging.getLogger("auto-attack.adapted")
_ADAPTED_LOG.addFilter(lambda record: "it is not possible to use the" not in record.getMessage())


def autoattack(model: nn.Module, attack_set: AutoAttackSet, *, epsilon: float, device, seed: int) -> AutoAttack:
    """A pyautoattack AutoAttack (L∞) configured for `attack_set`, as the standard version configures each attack."""
    if attack_set.version == "standard":
        adversary = AutoAttack(model, norm="Linf", eps=epsilon, version="standard", device=device, seed=seed)
    else:
        adversary = AutoAttack(
            model, attacks=list(attack_set.attacks), norm="Linf", eps=epsilon, version="custom", device=device, seed=seed
        )
        adversary.logger = _ADAPTED_LOG
        adversary.apgd_targeted = _TargetedCrossEntropyAPGD(
            model, n_restarts=1, n_iter=100, eps=epsilon, norm="Linf", eot_iter=1, rho=0.75, seed=seed, device=device, logger=_ADAPTED_LOG
        )
        adversary.apgd.n_restarts = 1  # the standard version's settings (the custom version keeps the constructor's 5)
        adversary.fab.n_restarts = 1
        adversary.square.n_queries = SQUARE_QUERIES
    adversary.apgd_targeted.n_target_classes = attack_set.target_classes
    adversary.fab.n_target_classes = attack_set.target_classes
    return adversary
