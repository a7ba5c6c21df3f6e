"""Every adversarial example stays inside the ε-ball and [0, 1], and the attacks actually attack."""

import pytest
import torch
import torch.nn.functional as F
from peeraid_models import create_model

from core.engine.attacks import fgsm, kl_attack, pgd

EPS = 8 / 255


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=4, in_channels=3).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=g)
    x[:8] = 0.0  # pixels on both edges of [0, 1], where projection onto the box matters
    x[8:16] = 1.0
    x[16:20] = (torch.rand(4, 3, 8, 8, generator=g) < 0.5).float()
    return x, torch.randint(0, 4, (32,), generator=g)


def all_attacks(model, x, y, step_size, steps):
    probs = F.softmax(model(x), 1).detach()
    return {
        "pgd": pgd(model, x, y, epsilon=EPS, step_size=step_size, steps=steps),
        "fgsm": fgsm(model, x, y, epsilon=EPS),
        "kl": kl_attack(model, x, probs, epsilon=EPS, step_size=step_size, steps=steps),
    }


@pytest.mark.parametrize("step_size,steps", [(2 / 255, 10), (1.0, 3), (EPS, 1)])
def test_adversarial_examples_stay_in_the_ball_and_the_box(model, batch, step_size, steps):
    x, y = batch
    for name, x_adv in all_attacks(model, x, y, step_size, steps).items():
        assert x_adv.shape == x.shape and not x_adv.requires_grad, name
        assert (x_adv - x).abs().max() <= EPS + 1e-6, name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name


def test_attacks_increase_their_loss(model, batch):
    x, y = batch
    clean_ce = F.cross_entropy(model(x), y, reduction="sum")
    for name in ("pgd", "fgsm"):
        x_adv = all_attacks(model, x, y, 2 / 255, 10)[name]
        assert F.cross_entropy(model(x_adv), y, reduction="sum") > clean_ce, name
    probs = F.softmax(model(x), 1).detach()
    kl = lambda x_: F.kl_div(F.log_softmax(model(x_), 1), probs, reduction="sum")
    x_adv = kl_attack(model, x, probs, epsilon=EPS, step_size=2 / 255, steps=10)
    x_noise = (x + EPS * torch.sign(torch.randn_like(x))).clamp(0, 1)
    assert kl(x_adv) > 3 * kl(x_noise)


def test_pgd_starts_uniformly_in_the_ball(model, batch):
    x, y = batch
    torch.manual_seed(0)
    a = pgd(model, x, y, epsilon=EPS, step_size=0.0, steps=1)
    torch.manual_seed(1)
    b = pgd(model, x, y, epsilon=EPS, step_size=0.0, steps=1)
    delta = (a - x)[20:]
    assert not torch.equal(a, b)
    assert delta.abs().max() <= EPS + 1e-6 and delta.abs().mean() > EPS / 4  # uniform, not 0.001·N(0, I)
