"""PeerAiD's training step against an independent transcription of the reference script's step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peeraid_models import create_model
from torch import nn

from core.engine.methods import AttackSettings, Networks, PeerAiD
from core.engine.spec import PeerAiDWeights

pytestmark = pytest.mark.filterwarnings("ignore:reduction. .mean. divides")  # the script uses the legacy reduction

EPS, ALPHA, K = 8 / 255, 2 / 255, 3
W = PeerAiDWeights(tau=5.0, gamma1=1.0, gamma2=0.1, tau_peer=1.0, lambda1=0.2, lambda2=1.0, lambda3=1.0)


def reference_step(student, peer, opt_s, opt_p, inputs, targets):
    """The authors' train_kd loop body, written out independently (legacy KLDivLoss 'mean', two S(x') forwards)."""
    opt_s.zero_grad()
    opt_p.zero_grad()
    peer.eval()
    with torch.no_grad():
        peer_logits = peer(inputs)
    peer.train()
    student.eval()
    x = inputs.detach() + 0.001 * torch.randn(inputs.shape).detach()
    for _ in range(K):
        x.requires_grad_()
        with torch.enable_grad():
            loss_kl = torch.sum(nn.KLDivLoss(reduction="none")(F.log_softmax(student(x), dim=1), F.softmax(peer_logits, dim=1)))
        grad = torch.autograd.grad(loss_kl, [x])[0]
        x = x.detach() + ALPHA * torch.sign(grad.detach())
        x = torch.min(torch.max(x, inputs - EPS), inputs + EPS)
        x = torch.clamp(x, 0, 1).detach()
    student.train()
    adv_outputs = peer(x)
    student_logit_target = student(x)
    kl = nn.KLDivLoss(reduction="mean")
    tp, t = W.tau_peer, W.tau
    loss_peer = (
        F.cross_entropy(adv_outputs, targets) * W.gamma1
        + kl(F.log_softmax(adv_outputs / tp, dim=1), F.softmax(student_logit_target / tp, dim=1)) * W.gamma2 * tp * tp
    )
    peer_outputs = adv_outputs.clone().detach()
    student_outputs = student(x)
    logit_nat = student(inputs)
    loss_student = (
        F.cross_entropy(student_outputs, targets) * W.lambda1
        + kl(F.log_softmax(student_outputs / t, dim=1), F.softmax(peer_outputs / t, dim=1)) * (W.lambda2 * t * t)
        + kl(F.log_softmax(student_outputs / t, dim=1), F.softmax(logit_nat / t, dim=1)) * (W.lambda3 * t * t)
    )
    (loss_peer + loss_student).backward()
    opt_p.step()
    opt_s.step()


def make_pair():
    torch.manual_seed(0)
    student = create_model("small_cnn", num_classes=3, in_channels=1)
    peer = create_model("small_cnn", num_classes=3, in_channels=1)
    return student, peer


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def batches(n_steps):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n_steps)]


def run_engine(student_adv_forwards, data):
    student, peer = make_pair()
    nets = Networks(student, sgd(student), peer, sgd(peer))
    method = PeerAiD(AttackSettings(EPS, ALPHA, K), W, student_adv_forwards=student_adv_forwards)
    torch.manual_seed(123)
    for x, y in data:
        method.step(nets, x, y)
    return student, peer


def run_reference(data):
    student, peer = make_pair()
    opt_s, opt_p = sgd(student), sgd(peer)
    torch.manual_seed(123)
    for x, y in data:
        reference_step(student, peer, opt_s, opt_p, x, y)
    return student, peer


def assert_same(a: nn.Module, b: nn.Module, which):
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if which(name):
            torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6, msg=name)


def is_running_stat(name):
    return "running_" in name or "num_batches" in name


def test_two_forward_step_matches_the_script_exactly():
    data = batches(3)
    ref_student, ref_peer = run_reference(data)
    student, peer = run_engine(2, data)
    assert_same(student, ref_student, lambda n: True)
    assert_same(peer, ref_peer, lambda n: True)
    start, _ = make_pair()
    assert not torch.equal(start.conv1.weight, student.conv1.weight), "the step must update the student"


def test_single_forward_step_changes_only_batchnorm_running_statistics():
    data = batches(1)
    ref_student, ref_peer = run_reference(data)
    student, peer = run_engine(1, data)
    # same losses, same gradients: every trainable parameter of both networks is identical ...
    assert_same(student, ref_student, lambda n: not is_running_stat(n))
    assert_same(peer, ref_peer, lambda n: True)
    # ... while the student's BatchNorm statistics saw x' once instead of twice
    assert not torch.allclose(student.bn1.running_mean, ref_student.bn1.running_mean)


def test_student_gets_gradient_from_the_peer_loss():
    """The peer's re-distillation target softmax(S(x')/τp) is not detached: removing the student loss
    (λ = 0) must still move the student."""
    student, peer = make_pair()
    before = copy.deepcopy(student.state_dict())
    nets = Networks(student, sgd(student), peer, sgd(peer))
    zero_student = PeerAiDWeights(tau=5.0, gamma1=1.0, gamma2=1.0, tau_peer=1.0, lambda1=0.0, lambda2=0.0, lambda3=0.0)
    x, y = batches(1)[0]
    PeerAiD(AttackSettings(EPS, ALPHA, K), zero_student).step(nets, x, y)
    moved = student.conv1.weight - before["conv1.weight"]
    # weight decay alone moves weights by lr·wd·w; the peer loss must add a real gradient on top
    decay_only = -0.1 * 2e-4 * before["conv1.weight"]
    assert (moved - decay_only).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["peeraid", "pgd_at", "trades"])
def test_a_failed_attack_leaves_the_networks_in_their_modes(method):
    """Each attack runs in eval mode; when it fails, the networks go back to train mode (the loop's state)."""
    from core.engine.methods import PGDAT, TRADES

    student, peer = make_pair()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    attack = AttackSettings(EPS, ALPHA, K)
    if method == "peeraid":  # a 4-class student against a 3-class peer: the attack's KL cannot pair them
        student = create_model("small_cnn", num_classes=4, in_channels=1)
        step = PeerAiD(attack, W)
    elif method == "pgd_at":  # label 7 of 3 classes: the attack's cross-entropy refuses it
        step, y = PGDAT(attack), torch.full((16,), 7)
    else:  # two channels for a one-channel network: the clean forward before the attack refuses it
        step, x = TRADES(attack), torch.rand(16, 2, 8, 8)
    nets = Networks(student, sgd(student), peer, sgd(peer))
    with pytest.raises((IndexError, RuntimeError)):
        step.step(nets, x, y)
    assert student.training and peer.training
