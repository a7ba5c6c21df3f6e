"""PeerAiD's two losses, exactly as the reference script computes them, and their weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import PeerAiDWeights


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
