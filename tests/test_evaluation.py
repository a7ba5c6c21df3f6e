"""The final report: its metric keys, its progress events (batch by batch, AutoAttack included, with the
batched AutoAttack equal to one pyautoattack call), cancellation between batches, and warnings for a
model at chance or collapsed onto one class."""

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from core.engine.callbacks import TrainingCallbacks
from core.engine.datasets import ImageDataset
from core.engine.errors import TrainingCancelled
from core.engine.evaluation import autoattack_accuracy, final_report, metric_label, outcome_warnings, pgd_key, report_keys
from core.engine.job import run_job

from .conftest import tiny_spec

EPS = 8 / 255


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, the more so on a busy machine
    yield
    torch.set_num_threads(threads)


def linear_case(num_classes, n=24, seed=0):
    """A random linear classifier and images it classifies as labelled: some survive ε = 8/255, some do not."""
    torch.manual_seed(num_classes + seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes)).eval()
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(1)
    return model, ImageDataset(images, labels, [str(c) for c in range(num_classes)])


class Recorder(TrainingCallbacks):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_evaluation(self, progress):
        self.events.append(progress)

    def should_stop(self):
        return self.stop_at is not None and len(self.events) > self.stop_at


def test_metric_keys_and_labels_have_one_home():
    assert report_keys(20, autoattack=True) == ["clean_acc", "fgsm_acc", "pgd20_acc", "autoattack_acc"]
    assert report_keys(7, autoattack=False) == ["clean_acc", "fgsm_acc", pgd_key(7)]
    assert [metric_label(k) for k in report_keys(50, True)] == ["Clean", "FGSM", "PGD-50", "AutoAttack"]


def test_batched_autoattack_equals_one_pyautoattack_call():
    model, dataset = linear_case(4, n=16)
    batched = autoattack_accuracy(model, dataset, epsilon=EPS, batch_size=10, seed=0)  # 2 calls: 10 and 6 images
    direct = AutoAttack(model, norm="Linf", eps=EPS, version="standard", device="cpu", seed=0)
    direct.apgd_targeted.n_target_classes = direct.fab.n_target_classes = 3
    _, y_adv = direct.run_standard_evaluation(dataset.images.float() / 255, dataset.labels, batch_size=16)
    assert batched * 16 == (y_adv == dataset.labels).sum().item()
    assert 0 < batched < 1


def test_progress_moves_batch_by_batch_through_every_attack():
    model, dataset = linear_case(4, n=20)
    recorder = Recorder()
    report = final_report(
        model,
        dataset,
        name="student",
        epsilon=EPS,
        step_size=2 / 255,
        pgd_steps=3,
        run_autoattack=True,
        autoattack_images=12,
        batch_size=8,
        device="cpu",
        seed=0,
        callbacks=recorder,
    )
    first = [e for e in recorder.events if e.attack == "clean, FGSM, PGD-3"]
    autoattack = [e for e in recorder.events if e.attack == "AutoAttack"]
    assert len(first) + len(autoattack) == len(recorder.events) and {e.model for e in recorder.events} == {"student"}
    assert [(e.batch, e.batches) for e in first] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert [(e.batch, e.batches) for e in autoattack] == [(0, 2), (1, 2), (2, 2)]  # on the first 12 images only
    assert first[0].accuracy_so_far is None and first[0].eta_seconds is None
    assert first[-1].accuracy_so_far == report.metrics["pgd3_acc"] and first[-1].eta_seconds == 0
    assert autoattack[-1].accuracy_so_far == report.metrics["autoattack_acc"]
    assert all(e.eta_seconds >= 0 for e in recorder.events if e.batch > 0)
    assert list(report.metrics) == report_keys(3, autoattack=True) and not report.failures


def test_a_cancelled_job_stops_between_evaluation_batches():
    model, dataset = linear_case(4, n=20)
    recorder = Recorder(stop_at=2)
    with pytest.raises(TrainingCancelled, match="evaluating the student"):
        final_report(
            model,
            dataset,
            name="student",
            epsilon=EPS,
            step_size=2 / 255,
            pgd_steps=3,
            run_autoattack=False,
            batch_size=8,
            device="cpu",
            seed=0,
            callbacks=recorder,
        )
    assert len(recorder.events) == 3


class Constant(nn.Module):
    """A collapsed classifier: the same logits, favouring `cls`, for every image."""

    def __init__(self, num_classes, cls):
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(cls), num_classes).float())

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_a_model_at_chance_or_on_one_class_is_flagged_with_advice():
    _, dataset = linear_case(10, n=40)
    warnings = outcome_warnings("student", Constant(10, 3), dataset, batch_size=16, device="cpu")
    assert [w["kind"] for w in warnings] == ["chance", "single_class"]
    share = (dataset.labels == 3).float().mean().item()
    assert warnings[0]["message"].startswith(f"the student is at chance: {share:.1%} clean accuracy on 40 test images")
    assert "predicts class '3' for 100% of the 40 test images" in warnings[1]["message"]
    assert all("more epochs" in w["advice"] and "labels" in w["advice"] for w in warnings)

    model, dataset = linear_case(10, n=40)  # right on every image, by construction
    assert outcome_warnings("student", model, dataset, batch_size=16, device="cpu") == []


def test_a_two_class_model_one_class_dataset_is_not_called_collapsed():
    """Predicting the one class that every image belongs to is right, not a collapse."""
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    dataset = ImageDataset(images, torch.ones(10, dtype=torch.int64), ["a", "b"])
    assert outcome_warnings("student", Constant(2, 1), dataset, batch_size=16, device="cpu") == []


def test_a_job_that_learns_nothing_says_so_in_its_result_and_card(tiny_splits, tmp_path):
    spec = tiny_spec(
        method="natural",
        epochs=1,
        lr=1e-6,
        lr_decay_epochs=[],
        swa=False,
        evaluation=dict(n_examples=32, autoattack=False, batch_size=64, pgd_steps=1),
    )
    result = run_job(spec, tiny_splits, tmp_path)
    kinds = {w["kind"] for w in result.warnings}
    assert "chance" in kinds and all(w["model"] == "student" for w in result.warnings)
    assert result.model_card["warnings"] == result.warnings
    md = result.artifacts["model_card_markdown"].read_text()
    assert "## Warnings" in md and "the student is at chance" in md and "What to try: train for more epochs" in md
