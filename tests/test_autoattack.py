"""AutoAttack for every class count from 2: the standard version where the classes allow it (equal,
image by image, to pyautoattack called directly), the adapted set below 4 classes (where the standard
version raises), and exact robust accuracy on a model whose robustness is known in closed form."""

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from core.engine.attacks import AutoAttackSet
from core.engine.datasets import DatasetSplits, ImageDataset, fingerprint
from core.engine.evaluation import autoattack_accuracy
from core.engine.pipeline import run_job

from .conftest import tiny_spec

EPS = 8 / 255


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is several times faster than two, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Bands(nn.Module):
    """Classifies an image by its mean brightness into C equal bands. An L∞ perturbation of size ε moves
    the mean by at most ε, so an image is robust exactly when its mean lies more than ε from a band edge."""

    def __init__(self, num_classes):
        super().__init__()
        self.register_buffer("centres", (torch.arange(num_classes) + 0.5) / num_classes)

    def forward(self, x):
        return -200 * (x.mean((1, 2, 3))[:, None] - self.centres) ** 2


def band_images(num_classes, n=12):
    """Images of every class: even ones at the band's centre (robust), odd ones ε/2 inside an inner band edge (not robust)."""
    labels = torch.arange(n) % num_classes
    robust = torch.arange(n) % 2 == 0
    half_band = 0.5 / num_classes
    towards_edge = torch.where(labels == 0, 1.0, -1.0)  # class 0's lower edge is 0: no other class lies below it
    means = (labels + 0.5) / num_classes + torch.where(robust, 0.0, (half_band - EPS / 2) * towards_edge)
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)) % 2 * 2 - 1  # texture with a mean of 0
    images = (means[:, None, None, None] * 255).round().to(torch.int64) + checkerboard
    return ImageDataset(images.clamp(0, 255).to(torch.uint8), labels, [str(c) for c in range(num_classes)]), robust


@pytest.mark.parametrize("num_classes", [2, 3, 4, 10])
def test_autoattack_breaks_exactly_the_images_that_are_not_robust(num_classes):
    dataset, robust = band_images(num_classes)
    model = Bands(num_classes)
    assert (model(dataset.images.float() / 255).argmax(1) == dataset.labels).all()
    assert autoattack_accuracy(model, dataset, epsilon=EPS, batch_size=12) * 12 == robust.sum().item()


@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_standard_version_fails_below_4_classes(num_classes):
    dataset, _ = band_images(num_classes)
    direct = AutoAttack(Bands(num_classes), norm="Linf", eps=EPS, version="standard", device="cpu", seed=0)
    direct.apgd_targeted.n_target_classes = direct.fab.n_target_classes = num_classes - 1
    with pytest.raises(IndexError, match="out of bounds"):
        direct.run_standard_evaluation(dataset.images.float() / 255, dataset.labels, batch_size=12)


@pytest.mark.parametrize("num_classes", [4, 10])
def test_from_4_classes_the_engine_runs_the_standard_version(num_classes):
    """The same robust accuracy as pyautoattack's standard version called directly (9 targets, or C − 1)."""
    torch.manual_seed(num_classes)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes)).eval()
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(1)  # every image correct before the attack
    dataset = ImageDataset(images, labels, [str(c) for c in range(num_classes)])
    engine = autoattack_accuracy(model, dataset, epsilon=EPS, batch_size=16, seed=3)

    direct = AutoAttack(model, norm="Linf", eps=EPS, version="standard", device="cpu", seed=3)
    if num_classes < 10:
        direct.apgd_targeted.n_target_classes = direct.fab.n_target_classes = num_classes - 1
    _, y_adv = direct.run_standard_evaluation(images.float() / 255, labels, batch_size=16)
    assert engine * 16 == (y_adv == labels).sum().item()
    assert 0 < engine < 1  # some images break, some hold


def test_the_attack_set_is_named_for_each_class_count():
    assert AutoAttackSet(100).to_dict() == {
        "version": "standard",
        "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
        "target_classes": 9,
        "targeted_loss": "dlr",
        "description": "standard version, L∞: APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), Square (5000 queries)",
    }
    assert AutoAttackSet(10).target_classes == 9 and AutoAttackSet(10).describe().startswith("standard version, L∞: ")
    assert AutoAttackSet(4).describe().startswith("standard version, L∞, with all 3 other classes as targets")
    three = AutoAttackSet(3)
    assert (three.version, three.attacks, three.target_classes) == ("custom", ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"), 2)
    assert (
        "targeted DLR loss needs 4 classes" in three.describe()
        and "APGD-T on the targeted cross-entropy loss (2 target classes)" in three.describe()
    )
    two = AutoAttackSet(2)
    assert (two.attacks, two.target_classes, two.targeted_loss) == (("apgd-ce", "apgd-t", "fab-t", "square"), 1, "ce")
    assert "FAB-T (1 target class)" in two.describe()


def test_a_two_class_job_reports_autoattack(tiny_splits, tmp_path):
    def two_classes(d):
        keep = d.labels < 2
        return ImageDataset(d.images[keep], d.labels[keep], d.classes[:2])

    train, val, test = (two_classes(d) for d in (tiny_splits.train, tiny_splits.val, tiny_splits.test))
    splits = DatasetSplits("digits-0-1", train, val, test, fingerprint(train, val, test))
    spec = tiny_spec(epochs=1, lr_decay_epochs=[], swa=False, evaluation=dict(n_examples=6, autoattack=True, batch_size=64, pgd_steps=2))
    result = run_job(spec, splits, tmp_path)
    assert result.evaluation["status"] == "complete" and result.evaluation["failures"] == []
    assert result.evaluation["autoattack"]["description"].startswith("adapted to 2 classes")
    for m in result.report.values():
        assert 0 <= m["test"]["autoattack_acc"] <= m["test"]["pgd2_acc"] + 0.1
    assert "AutoAttack: adapted to 2 classes" in result.artifacts["model_card_markdown"].read_text()
