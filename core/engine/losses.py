"""PeerAiD's two losses, exactly as the reference script computes them, and their weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


def kl_sum(log_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Σ probs·(log probs − log_probs): `F.kl_div(log_probs, probs, reduction="sum")`, the same value
    bit for bit, but with a finite gradient where a target probability is exactly 0.

    PeerAiD's targets softmax(s_adv/τp) and softmax(s_nat/τ) are not detached. Since kl_div became a
    composite of xlogy (PyTorch 1.13, pytorch/pytorch#80334), its gradient with respect to such a zero
    is 0/0 = NaN, and one underflowed softmax entry turns the whole step NaN (seen: ResNet-18 on the
    digits at lr 0.1, step 7, on CPU and on an H200). PyTorch ≤ 1.12 masked that gradient to 0, which
    is also the limit of the true gradient through the softmax (p·log p → 0)."""
    positive = probs > 0
    safe = torch.where(positive, probs, 1.0)
    return (torch.xlogy(probs, safe) - probs * torch.where(positive, log_probs, 0.0)).sum()


def kl_mean(log_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """PyTorch's legacy `KLDivLoss(reduction='mean')`: Σ probs·(log probs − log_probs) / (batch × classes).

    The published hyperparameters were tuned with this reduction; 'batchmean' would multiply
    the distillation terms by the number of classes."""
    # written out rather than reduction="mean", which PyTorch announces will turn into 'batchmean'
    return kl_sum(log_probs, probs) / log_probs.numel()


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


def peer_loss(p_adv: torch.Tensor, s_adv: torch.Tensor, y: torch.Tensor, w: PeerAiDWeights) -> torch.Tensor:
    """γ1·CE(p_adv, y) + γ2·τp²·KLmean(log_softmax(p_adv/τp), softmax(s_adv/τp)); s_adv is NOT detached."""
    t = w.tau_peer
    return w.gamma1 * F.cross_entropy(p_adv, y) + w.gamma2 * t * t * kl_mean(F.log_softmax(p_adv / t, dim=1), F.softmax(s_adv / t, dim=1))


def student_loss(s_adv: torch.Tensor, p_adv: torch.Tensor, s_nat: torch.Tensor, y: torch.Tensor, w: PeerAiDWeights) -> torch.Tensor:
    """λ1·CE(s_adv, y) + λ2·τ²·KLmean(s_adv/τ ‖ p_adv.detach()/τ) + λ3·τ²·KLmean(s_adv/τ ‖ s_nat/τ); s_nat NOT detached."""
    t = w.tau
    log_s_adv = F.log_softmax(s_adv / t, dim=1)
    return (
        w.lambda1 * F.cross_entropy(s_adv, y)
        + w.lambda2 * t * t * kl_mean(log_s_adv, F.softmax(p_adv.detach() / t, dim=1))
        + w.lambda3 * t * t * kl_mean(log_s_adv, F.softmax(s_nat / t, dim=1))
    )


def trades_loss(s_adv: torch.Tensor, s_nat: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES (Zhang et al. 2019): CE(s_nat, y) + β·KL(softmax(s_nat) ‖ softmax(s_adv)) averaged over the batch."""
    kl = kl_sum(F.log_softmax(s_adv, dim=1), F.softmax(s_nat, dim=1)) / len(s_adv)  # kl_div's "batchmean"
    return F.cross_entropy(s_nat, y) + beta * kl
