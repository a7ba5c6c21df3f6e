"""The final report: its metric keys, its progress events (batch by batch, AutoAttack included and between
its attacks, with the batched AutoAttack equal to one pyautoattack call), cancellation between batches,
representative subsets of a class-sorted test split (seeded, class-stratified, the same images for every
attack), per-class figures, and warnings for a model at chance or collapsed onto one class, for figures
from a subset and for a stronger attack that does better than a weaker one."""

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from core.engine.callbacks import TrainingCallbacks
from core.engine.datasets import ImageDataset
from core.engine.errors import TrainingCancelled
from core.engine.evaluation import (
    ModelReport,
    attack_order_warnings,
    autoattack_accuracy,
    evaluation_sample,
    final_report,
    outcome_warnings,
    predictions,
    subset_warning,
)
from core.engine.pipeline import run_job
from core.engine.report import metric_label, pgd_key, report_keys

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
        autoattack_index=torch.arange(12),
        batch_size=8,
        device="cpu",
        seed=0,
        callbacks=recorder,
    )
    first = [e for e in recorder.events if e.attack == "clean, FGSM, PGD-3"]
    autoattack = [e for e in recorder.events if e.attack == "AutoAttack"]
    assert len(first) + len(autoattack) == len(recorder.events) and {e.model for e in recorder.events} == {"student"}
    assert [(e.batch, e.batches) for e in first] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert autoattack[0].batch == 0 and autoattack[-1].batch == 2 and {e.batches for e in autoattack} == {2}  # 12 images
    assert len(autoattack) > 3, "AutoAttack reports between its attacks, not only per batch"
    assert first[0].accuracy_so_far is None and first[0].eta_seconds is None
    assert first[-1].accuracy_so_far == report.metrics["pgd3_acc"]
    assert autoattack[-1].accuracy_so_far == report.metrics["autoattack_acc"]
    fractions = [e.fraction for e in recorder.events]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1 and len(set(fractions)) > 5
    assert first[-1].fraction < 0.05, "AutoAttack is planned as most of the work"
    assert all(e.eta_seconds >= 0 and e.images_per_sec > 0 for e in recorder.events if e.batch > 0)
    assert recorder.events[-1].eta_seconds == 0
    assert list(report.metrics) == report_keys(3, autoattack=True) and not report.failures


def class_sorted_case(per_class=50, classes=4):
    """A test split sorted by class, as a folder dataset's is, and a model right on classes 0 and 1 only:
    the first N images would make it look perfect."""
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = (labels * 60).to(torch.uint8)  # the class, readable from one pixel

    class HalfRight(nn.Module):
        def forward(self, x):
            label = (x[:, 0, 0, 0] * 255 / 60).round().long()
            guess = torch.where(label < 2, label, (label + 1) % classes)
            return torch.nn.functional.one_hot(guess, classes).float() * 10 + 0 * x.sum()

    return HalfRight(), ImageDataset(images, labels, [f"class{c}" for c in range(classes)])


def test_a_subset_of_a_class_sorted_test_split_is_stratified_and_seeded():
    model, test = class_sorted_case()
    sample = evaluation_sample(test, 50, 20, seed=0)
    evaluated = test.subset(sample.index)
    assert torch.bincount(evaluated.labels).tolist() == [13, 13, 12, 12]
    assert torch.bincount(evaluated.labels[sample.autoattack_index]).tolist() == [5, 5, 5, 5]
    assert torch.equal(sample.index, evaluation_sample(test, 50, 20, seed=0).index)
    assert not torch.equal(sample.index, evaluation_sample(test, 50, 20, seed=1).index)
    assert sample.describe(test) == {
        "test_images": 200,
        "evaluated": 50,
        "autoattack": 20,
        "method": "class-stratified sample",
        "seed": 0,
        "per_class": {
            "evaluated": {"class0": 13, "class1": 13, "class2": 12, "class3": 12},
            "autoattack": {"class0": 5, "class1": 5, "class2": 5, "class3": 5},
        },
    }
    whole = evaluation_sample(test, None, None, seed=0)
    assert torch.equal(whole.index, torch.arange(200)) and whole.describe(test)["method"] == "the whole test split"
    clean = predictions(model, evaluated, {"clean": None})["clean"]
    assert (clean == evaluated.labels).float().mean().item() == pytest.approx(26 / 50)  # the first 50 would say 100%


def test_the_report_gives_per_class_figures_and_every_attack_on_autoattacks_images():
    model, dataset = linear_case(4, n=40)
    sample = evaluation_sample(dataset, None, 16, seed=0)
    report = final_report(
        model,
        dataset,
        name="student",
        epsilon=EPS,
        step_size=2 / 255,
        pgd_steps=3,
        run_autoattack=True,
        autoattack_index=sample.autoattack_index,
        batch_size=16,
        device="cpu",
        seed=0,
    )
    assert set(report.per_class) == set(report_keys(3, autoattack=True))
    for key, by_class in report.per_class.items():
        images = dataset.subset(sample.autoattack_index) if key == "autoattack_acc" else dataset
        counts = torch.bincount(images.labels, minlength=4)
        weighted = sum(by_class[c] * counts[int(c)].item() for c in by_class) / len(images)
        assert weighted == pytest.approx(report.metrics[key])
    on_aa = report.on_autoattack_images
    assert list(on_aa) == report_keys(3, autoattack=True) and on_aa["autoattack_acc"] == report.metrics["autoattack_acc"]
    pgd_on_aa = predictions(model, dataset.subset(sample.autoattack_index), {"clean": None})["clean"]
    assert on_aa["clean_acc"] == (pgd_on_aa == dataset.labels[sample.autoattack_index]).float().mean().item()
    assert on_aa["autoattack_acc"] <= on_aa["pgd3_acc"] <= on_aa["clean_acc"]


def test_a_stronger_attack_doing_better_than_a_weaker_one_is_flagged():
    honest = ModelReport(metrics={"clean_acc": 0.9, "fgsm_acc": 0.6, "pgd20_acc": 0.5, "autoattack_acc": 0.45})
    assert attack_order_warnings("student", honest, 200, 200) == []
    masked = ModelReport(
        metrics={"clean_acc": 0.9, "fgsm_acc": 0.4, "pgd20_acc": 0.5, "autoattack_acc": 0.61},
        on_autoattack_images={"clean_acc": 0.9, "fgsm_acc": 0.4, "pgd20_acc": 0.55, "autoattack_acc": 0.61},
    )
    warnings = attack_order_warnings("student", masked, 200, 100)
    assert [w["kind"] for w in warnings] == ["attack_order", "attack_order"]
    assert warnings[0]["message"] == (
        "on the same 200 test images, PGD-20 leaves the student 50.0% accuracy, above the 40.0% of the weaker FGSM"
    )
    assert warnings[1]["message"].startswith("on the same 100 test images, AutoAttack leaves the student 61.0% accuracy, above the 55.0%")
    assert "trust the lower figure" in warnings[0]["advice"]
    # AutoAttack on fewer images than PGD is compared only on its own images, never with the figure of other images
    assert len(attack_order_warnings("student", ModelReport(metrics=masked.metrics), 200, 100)) == 1


def test_figures_from_a_subset_carry_a_warning():
    assert subset_warning(200, 200, 200, seed=0) is None and subset_warning(200, 200, None, seed=0) is None
    both = subset_warning(200, 50, 20, seed=3)
    assert both["kind"] == "subset" and both["model"] == "evaluation"
    assert both["message"].startswith("every figure comes from 50 of the 200 test images; AutoAttack's from 20 of them")
    assert "seed 3" in both["message"] and "11.2 points" in both["message"]
    assert subset_warning(200, 200, 100, seed=0)["message"].startswith("AutoAttack's from 100 of the 200 test images")


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


def clean_predictions(model, dataset):
    return predictions(model, dataset, {"clean": None}, batch_size=16)["clean"]


def test_a_model_at_chance_or_on_one_class_is_flagged_with_advice():
    _, dataset = linear_case(10, n=40)
    warnings = outcome_warnings("student", clean_predictions(Constant(10, 3), dataset), dataset)
    assert [w["kind"] for w in warnings] == ["chance", "single_class"]
    share = (dataset.labels == 3).float().mean().item()
    assert warnings[0]["message"].startswith(f"the student is at chance: {share:.1%} clean accuracy on 40 test images")
    assert "predicts class '3' for 100% of the 40 test images" in warnings[1]["message"]
    assert all("more epochs" in w["advice"] and "labels" in w["advice"] for w in warnings)

    model, dataset = linear_case(10, n=40)  # right on every image, by construction
    assert outcome_warnings("student", clean_predictions(model, dataset), dataset) == []


def test_a_two_class_model_one_class_dataset_is_not_called_collapsed():
    """Predicting the one class that every image belongs to is right, not a collapse."""
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    dataset = ImageDataset(images, torch.ones(10, dtype=torch.int64), ["a", "b"])
    assert outcome_warnings("student", clean_predictions(Constant(2, 1), dataset), dataset) == []


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
    assert "chance" in kinds and all(w["model"] == "student" for w in result.warnings if w["kind"] != "subset")
    assert result.warnings[0]["kind"] == "subset" and "32 of the 64 test images" in result.warnings[0]["message"]
    assert result.model_card["warnings"] == result.warnings
    md = result.artifacts["model_card_markdown"].read_text()
    assert "## Warnings" in md and "the student is at chance" in md and "What to try: train for more epochs" in md
