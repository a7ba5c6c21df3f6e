"""L∞ attacks. Each returns a detached batch inside the ε-ball around x and inside [0, 1].

The caller chooses the model's mode (the reference script attacks in eval mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    """PGD-k on cross-entropy with a uniform random start in the ε-ball (Madry et al.)."""
    x = x.detach()
    # noise drawn in logical (NCHW) order, so the same seed gives the same start in any memory format
    noise = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    x_adv = x + noise.uniform_(-epsilon, epsilon) if random_start and steps > 0 else x
    if random_start and steps > 0:
        x_adv = x_adv.clamp(0, 1)
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
        step = _ascend(
            model, x_adv, lambda logits: F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")
        )
        x_adv = project(x_adv.detach() + step_size * step, x, epsilon)
    return x_adv.detach()
