"""Each PeerAiD loss term against an independent computation, and the gradient paths the spec flags."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.engine.losses import kl_mean, kl_sum, peer_loss, student_loss, trades_loss
from core.engine.spec import PeerAiDWeights

W = PeerAiDWeights(tau=5.0, gamma1=1.0, gamma2=0.1, tau_peer=2.0, lambda1=0.3, lambda2=1.0, lambda3=0.7)


def fixed_logits(seed: int, n: int = 4, c: int = 3) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax(z, t=1.0):
    e = [[math.exp(v / t) for v in row] for row in z.tolist()]
    return [[v / sum(row) for v in row] for row in e]


def kl_mean_by_hand(student_logits, target_logits, t):
    """Σ over batch and classes of q·(log q − log p), divided by batch × classes (legacy 'mean')."""
    p, q = softmax(student_logits, t), softmax(target_logits, t)
    terms = [qi * (math.log(qi) - math.log(pi)) for prow, qrow in zip(p, q, strict=True) for pi, qi in zip(prow, qrow, strict=True)]
    return sum(terms) / len(terms)


def ce_by_hand(logits, y):
    p = softmax(logits)
    return -sum(math.log(row[label]) for row, label in zip(p, y.tolist(), strict=True)) / len(p)


def test_kl_mean_divides_by_batch_times_classes():
    a, b = fixed_logits(0), fixed_logits(1)
    got = kl_mean(torch.log_softmax(a, 1), torch.softmax(b, 1)).item()
    assert got == pytest.approx(kl_mean_by_hand(a, b, 1.0), rel=1e-12)
    batchmean = torch.nn.functional.kl_div(torch.log_softmax(a, 1), torch.softmax(b, 1), reduction="batchmean").item()
    assert batchmean == pytest.approx(got * a.shape[1], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_sum_is_kl_div_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 100, generator=g, dtype=dtype), 4 * torch.randn(64, 100, generator=g, dtype=dtype)
    log_probs, probs = F.log_softmax(a, 1), F.softmax(b, 1)
    assert torch.equal(kl_sum(log_probs, probs), F.kl_div(log_probs, probs, reduction="sum"))


def underflowing_logits() -> torch.Tensor:
    """Logits whose softmax is exactly 0 in two places (a gap over ~104 underflows in float32)."""
    logits = torch.zeros(4, 3)
    logits[1, 0], logits[3, 2] = 150.0, 120.0
    assert (F.softmax(logits, 1) == 0).sum() == 4
    return logits


def test_an_underflowed_non_detached_target_gives_a_finite_step():
    """PyTorch's kl_div returns NaN for the gradient at a zero target (pytorch/pytorch#89558); one such
    entry made every parameter NaN at step 7 of a ResNet-18 training. The losses keep it finite, with the
    limit's value: the underflowed entries contribute nothing."""
    s_adv, p_adv, s_nat = underflowing_logits().requires_grad_(), fixed_logits(14).float(), underflowing_logits().requires_grad_()
    torch_kl = F.kl_div(F.log_softmax(p_adv, 1), F.softmax(s_adv, 1), reduction="sum")
    assert torch.autograd.grad(torch_kl, s_adv)[0].isnan().any()  # the failure this guards against

    y = torch.tensor([0, 1, 2, 0])
    p_adv.requires_grad_()
    (peer_loss(p_adv, s_adv, y, W) + student_loss(s_adv, p_adv, s_nat, y, W) + trades_loss(s_adv, s_nat, y, 6.0)).backward()
    assert all(t.grad.isfinite().all() for t in (s_adv, p_adv, s_nat))
    # against float64, where nothing underflows: the same gradient
    s64, p64, n64 = (t.detach().double().requires_grad_() for t in (s_adv, p_adv, s_nat))
    (peer_loss(p64, s64, y, W) + student_loss(s64, p64, n64, y, W) + trades_loss(s64, n64, y, 6.0)).backward()
    for got, want in ((s_adv, s64), (p_adv, p64), (s_nat, n64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)


def test_peer_loss_matches_hand_computation():
    p_adv, s_adv, y = fixed_logits(2), fixed_logits(3), torch.tensor([0, 2, 1, 2])
    expected = W.gamma1 * ce_by_hand(p_adv, y) + W.gamma2 * W.tau_peer**2 * kl_mean_by_hand(p_adv, s_adv, W.tau_peer)
    assert peer_loss(p_adv, s_adv, y, W).item() == pytest.approx(expected, rel=1e-12)


def test_student_loss_matches_hand_computation():
    s_adv, p_adv, s_nat, y = fixed_logits(4), fixed_logits(5), fixed_logits(6), torch.tensor([1, 1, 0, 2])
    t = W.tau
    expected = (
        W.lambda1 * ce_by_hand(s_adv, y)
        + W.lambda2 * t * t * kl_mean_by_hand(s_adv, p_adv, t)
        + W.lambda3 * t * t * kl_mean_by_hand(s_adv, s_nat, t)
    )
    assert student_loss(s_adv, p_adv, s_nat, y, W).item() == pytest.approx(expected, rel=1e-12)


def test_peer_loss_sends_gradient_into_the_student_through_its_target():
    p_adv, s_adv = fixed_logits(7).requires_grad_(), fixed_logits(8).requires_grad_()
    peer_loss(p_adv, s_adv, torch.tensor([0, 1, 2, 0]), W).backward()
    assert s_adv.grad is not None and s_adv.grad.abs().sum() > 0
    # d/ds of γ2·τp²·mean(q·(log q − log p)) with q = softmax(s/τp): check one entry by finite differences
    eps = 1e-6
    bumped = s_adv.detach().clone()
    bumped[0, 1] += eps
    y = torch.tensor([0, 1, 2, 0])
    numeric = (peer_loss(p_adv.detach(), bumped, y, W) - peer_loss(p_adv.detach(), s_adv.detach(), y, W)).item() / eps
    assert s_adv.grad[0, 1].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9)


def test_student_loss_gradient_flows_into_s_nat_but_not_p_adv():
    s_adv, p_adv, s_nat = (fixed_logits(s).requires_grad_() for s in (9, 10, 11))
    student_loss(s_adv, p_adv, s_nat, torch.tensor([2, 0, 1, 1]), W).backward()
    assert s_nat.grad is not None and s_nat.grad.abs().sum() > 0
    assert p_adv.grad is None
    assert s_adv.grad.abs().sum() > 0


def test_trades_loss_matches_hand_computation():
    s_adv, s_nat, y = fixed_logits(12), fixed_logits(13), torch.tensor([0, 1, 2, 1])
    # TRADES: KL(softmax(nat) ‖ softmax(adv)) summed over classes, averaged over the batch
    kl = kl_mean_by_hand(s_adv, s_nat, 1.0) * s_adv.shape[1]
    assert trades_loss(s_adv, s_nat, y, beta=6.0).item() == pytest.approx(ce_by_hand(s_nat, y) + 6.0 * kl, rel=1e-12)


def test_weights_are_one_validated_type_from_spec_to_step():
    from pydantic import ValidationError

    from core.engine.spec import build_spec
    from core.engine.trainer import make_method

    with pytest.raises(ValidationError, match="tau"):
        PeerAiDWeights(tau=0)
    with pytest.raises(ValidationError, match="temperature"):
        PeerAiDWeights(temperature=4)
    spec = build_spec("cifar100-resnet18")
    assert type(spec.peeraid) is PeerAiDWeights
    assert make_method(spec).weights is spec.peeraid
