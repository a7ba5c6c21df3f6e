"""Clean and robust accuracy: per-epoch validation (clean + PGD-10) and the final report
(clean, FGSM, PGD-20, AutoAttack) with its progress and its warnings. Models are evaluated in eval
mode, in large batches."""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attacks import AutoAttackSet, autoattack, fgsm, pgd
from .callbacks import EvaluationProgress, TrainingCallbacks
from .datasets import ImageDataset, stratified_sample
from .errors import TrainingCancelled
from .faults import fault_point
from .methods import eval_mode
from .report import AUTOATTACK_KEY, CLEAN_KEY, FGSM_KEY, VALIDATION_PGD_KEY, metric_label, pgd_key

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
OnBatch = Callable[[float, int, float | None], None]  # (batches done, fractions within one included; batches; accuracy so far)


def _batches(dataset: ImageDataset, batch_size: int, device: torch.device, memory_format: torch.memory_format):
    for start in range(0, len(dataset), batch_size):
        x = dataset.images[start : start + batch_size].to(device, non_blocking=True).float().div_(255)
        yield x.contiguous(memory_format=memory_format), dataset.labels[start : start + batch_size].to(device, non_blocking=True)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """Feed inputs in the layout the model's convolutions are in (channels_last on the fast GPU path)."""
    conv = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels_last = conv is not None and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def predictions(
    model: nn.Module,
    dataset: ImageDataset,
    attacks: dict[str, Attack | None],
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The class `model` gives each image of `dataset` under each attack (None = clean): {attack: int64 N, on
    the CPU}, in one pass over the data; `on_batch(batches done, batches, accuracies so far)` after each batch."""
    device = torch.device(device)
    batches = math.ceil(len(dataset) / batch_size)
    predicted: dict[str, list[torch.Tensor]] = {name: [] for name in attacks}
    correct = {name: torch.zeros((), dtype=torch.int64, device=device) for name in attacks}
    seen = 0
    with eval_mode(model):
        for batch, (x, y) in enumerate(_batches(dataset, batch_size, device, _memory_format(model)), 1):
            for name, attack in attacks.items():
                adversarial = x if attack is None else attack(model, x, y)
                with torch.no_grad():
                    guess = model(adversarial).argmax(1)
                predicted[name].append(guess)  # kept on the device: no host sync per batch (the per-epoch validation)
                correct[name] += (guess == y).sum()
            seen += len(y)
            if on_batch is not None:
                on_batch(batch, batches, {name: c.item() / seen for name, c in correct.items()})
    return {name: torch.cat(p).cpu() if p else torch.zeros(0, dtype=torch.int64) for name, p in predicted.items()}


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return int((predicted == labels).sum()) / max(1, len(labels))


def accuracies(
    model: nn.Module,
    dataset: ImageDataset,
    attacks: dict[str, Attack | None],
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Accuracy of `model` on `dataset` under each attack (None = clean), in one pass over the data."""
    predicted = predictions(model, dataset, attacks, batch_size=batch_size, device=device, on_batch=on_batch)
    return {name: accuracy(p, dataset.labels) for name, p in predicted.items()}


def pgd_attack(epsilon: float, step_size: float, steps: int) -> Attack:
    return lambda model, x, y: pgd(model, x, y, epsilon=epsilon, step_size=step_size, steps=steps)


def fgsm_attack(epsilon: float) -> Attack:
    return lambda model, x, y: fgsm(model, x, y, epsilon=epsilon)


def validation_metrics(
    model: nn.Module, dataset: ImageDataset, *, epsilon: float, step_size: float, steps: int, batch_size: int, device
) -> dict[str, float]:
    """The per-epoch model-selection metrics: clean and PGD-`steps` accuracy (CE, uniform random start)."""
    return accuracies(
        model,
        dataset,
        {CLEAN_KEY: None, VALIDATION_PGD_KEY: pgd_attack(epsilon, step_size, steps)},
        batch_size=batch_size,
        device=device,
    )


class _AttackWatch:
    """pyautoattack's logger, passed through, telling `on_attack` which attack of the ensemble starts
    (AutoAttack logs "running <attack>" before each): progress within one pyautoattack call."""

    def __init__(self, logger: Any, on_attack: Callable[[str], None]):
        self._logger, self._on_attack = logger, on_attack

    def debug(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(message, str) and message.startswith("running "):
            self._on_attack(message.removeprefix("running "))
        self._logger.debug(message, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def autoattack_predictions(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    epsilon: float,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_batch: OnBatch | None = None,
) -> torch.Tensor:
    """The class `model` gives each image after AutoAttack, L∞ (pyautoattack; the input's class where it held),
    with the attack set `AutoAttackSet` chooses for the dataset's number of classes: the standard version from
    10 classes on. int64 N, on the CPU.

    pyautoattack runs on `batch_size` images at a time, each call exactly as pyautoattack on those images
    alone, so that `on_batch(batches done, batches, accuracy so far)` can report progress — also between
    the ensemble's attacks within a call, as a fraction of a batch; with at most `batch_size` images it is a
    single call. The price: the attacks after APGD-CE run on each batch's survivors, in smaller batches than
    one call would gather (on a CPU with a small model, 2 batches of 25 took 1.6× as long as 1 of 50)."""
    device = torch.device(device)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    attack_set = AutoAttackSet(len(dataset.classes))
    adversary = autoattack(model, attack_set, epsilon=epsilon, device=device, seed=seed)
    batches = math.ceil(len(dataset) / batch_size)
    predicted: list[torch.Tensor] = []
    robust = seen = 0
    done = 0  # batches finished

    def on_attack(name: str) -> None:
        if on_batch is not None and name in attack_set.attacks:
            on_batch(done + attack_set.attacks.index(name) / len(attack_set.attacks), batches, robust / seen if seen else None)

    adversary.logger = _AttackWatch(adversary.logger, on_attack)
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device).float().div_(255)
            y = dataset.labels[start : start + batch_size].to(device)
            _x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            predicted.append(y_adv.cpu())
            robust += int((y_adv == y).sum())
            seen += len(y)
            done += 1
            if on_batch is not None:
                on_batch(done, batches, robust / seen)
    return torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.int64)


def autoattack_accuracy(model: nn.Module, dataset: ImageDataset, *, epsilon: float, **kwargs: Any) -> float:
    """Robust accuracy under AutoAttack (autoattack_predictions)."""
    return accuracy(autoattack_predictions(model, dataset, epsilon=epsilon, **kwargs), dataset.labels)


class EvaluationTracker:
    """The progress of a whole final evaluation — every model, every attack — for the callbacks. Each stage
    (model, attack) has its planned work (forward-equivalent passes, as the pre-flight estimate counts them);
    the fraction done and the ETA follow the work done and its pace so far. A cancelled job stops here,
    between batches (and between AutoAttack's attacks)."""

    def __init__(self, callbacks: TrainingCallbacks, planned: dict[tuple[str, str], float]):
        self.callbacks = callbacks
        self.planned = dict(planned)
        self.total = sum(self.planned.values()) or 1.0
        self.finished = 0.0  # the planned work of the stages that ended
        self.started = time.perf_counter()

    def stage(self, model: str, attack: str, batches: int, images: int) -> _Progress:
        self.planned.setdefault((model, attack), 0.0)
        return _Progress(self, model, attack, batches, images)

    def report(self, stage: _Progress, batch: float, accuracy: float | None) -> None:
        if self.callbacks.should_stop():
            raise TrainingCancelled(f"cancelled while evaluating the {stage.model} ({stage.attack})")
        planned = self.planned[(stage.model, stage.attack)]
        done = self.finished + planned * min(1.0, batch / max(1, stage.batches))
        elapsed = time.perf_counter() - self.started
        stage_elapsed = time.perf_counter() - stage.started
        self.callbacks.on_evaluation(
            EvaluationProgress(
                model=stage.model,
                attack=stage.attack,
                batch=int(batch),
                batches=stage.batches,
                accuracy_so_far=accuracy,
                eta_seconds=elapsed / done * (self.total - done) if done > 0 else None,
                fraction=round(min(1.0, done / self.total), 4),
                images_per_sec=stage.images * batch / stage.batches / stage_elapsed if batch > 0 and stage_elapsed > 0 else None,
            )
        )

    def end(self, stage: _Progress) -> None:
        self.finished += self.planned.pop((stage.model, stage.attack), 0.0)


class _Progress:
    """One stage's progress events (model, attack), with AutoAttack's attacks as fractions of a batch."""

    def __init__(self, tracker: EvaluationTracker, model: str, attack: str, batches: int, images: int):
        self.tracker, self.model, self.attack, self.batches, self.images = tracker, model, attack, batches, images
        self.started = time.perf_counter()
        self(0, batches, None)

    def __call__(self, batch: float, batches: int, accuracy: float | None) -> None:
        self.tracker.report(self, batch, accuracy)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tracker.end(self)


def first_pass_label(pgd_steps: int) -> str:
    """The report's first pass over the test images, as progress events name it."""
    return f"clean, FGSM, PGD-{pgd_steps}"


def first_pass_work(images: int, pgd_steps: int) -> float:
    """Forward-equivalent passes of the report's first pass (a backward costs about two forwards): clean
    (1), FGSM (1 + 2) and PGD (3 per step, its final forward counted in the last)."""
    return images * (1 + 3 + 3 * pgd_steps)


# AutoAttack's passes per image, as measured on the standard version (9 target classes) with a model of typical
# robustness (bench.preflight's digits). A point that survives costs APGD-CE about 300 passes, Square up to 5,000
# queries, and per target class APGD-T about 300 and FAB-T about 400: 46% of it does not depend on the number of
# target classes, and each target adds 6% (fewer classes, fewer targets: 3 at 4 classes, 64% of the work).
AUTOATTACK_FORWARDS_PER_IMAGE = 3000
AUTOATTACK_FIXED_SHARE, AUTOATTACK_TARGET_SHARE = 0.46, 0.06


def autoattack_work(images: int, num_classes: int) -> float:
    """AutoAttack's forward-equivalent passes on `images` images of a `num_classes`-class model."""
    targets = AutoAttackSet(num_classes).target_classes
    return images * AUTOATTACK_FORWARDS_PER_IMAGE * (AUTOATTACK_FIXED_SHARE + AUTOATTACK_TARGET_SHARE * targets)


def planned_work(
    models: list[str], images: int, pgd_steps: int, autoattack_images: int | None, num_classes: int
) -> dict[tuple[str, str], float]:
    """The final evaluation's stages, (model, attack), with their planned work: the first pass on `images`,
    then AutoAttack on `autoattack_images` (None: not run), for each model."""
    work = {(model, first_pass_label(pgd_steps)): first_pass_work(images, pgd_steps) for model in models}
    if autoattack_images is not None:
        work |= {(model, "AutoAttack"): autoattack_work(autoattack_images, num_classes) for model in models}
    return work


@dataclass(frozen=True)
class EvaluationSample:
    """The test images a final report evaluates: `index` into the test split (every attack runs on these) and
    `autoattack_index` into those (AutoAttack's, a subset of them), each a seeded, class-stratified sample
    where the spec asks for fewer images than there are (never the first N: a folder dataset's test split is
    sorted by class)."""

    index: torch.Tensor
    autoattack_index: torch.Tensor
    seed: int

    @property
    def images(self) -> int:
        return len(self.index)

    @property
    def autoattack_images(self) -> int:
        return len(self.autoattack_index)

    def describe(self, test: ImageDataset) -> dict[str, Any]:
        """For the report and the model card: how many images of each class every attack (and AutoAttack) saw."""
        evaluated = test.subset(self.index)
        sampled = self.images < len(test) or self.autoattack_images < self.images
        return {
            "test_images": len(test),
            "evaluated": self.images,
            "autoattack": self.autoattack_images,
            "method": "class-stratified sample" if sampled else "the whole test split",
            "seed": self.seed if sampled else None,
            "per_class": {
                "evaluated": _class_counts(evaluated),
                "autoattack": _class_counts(evaluated.subset(self.autoattack_index)),
            },
        }


def evaluation_sample(test: ImageDataset, n_examples: int | None, autoattack_n_examples: int | None, seed: int) -> EvaluationSample:
    """The images `evaluation.n_examples` and `evaluation.autoattack_n_examples` (None: all; pass None where
    AutoAttack does not run) ask for."""
    index = stratified_sample(test, n_examples or len(test), seed)
    autoattack_index = stratified_sample(test.subset(index), autoattack_n_examples or len(index), seed)
    return EvaluationSample(index, autoattack_index, seed)


def _class_counts(dataset: ImageDataset) -> dict[str, int]:
    counts = torch.bincount(dataset.labels, minlength=dataset.num_classes).tolist()
    return {name: n for name, n in zip(dataset.classes, counts, strict=True) if n}


@dataclass
class ModelReport:
    """One model's final report: its test metrics (report_keys order), per class ({metric: {class: accuracy}});
    where AutoAttack ran on fewer images than the rest, every metric on AutoAttack's own images
    (`on_autoattack_images`, so that the attacks compare on the same images); the attacks that raised
    instead ({attack: error}); and warnings about the outcome ([{model, kind, message, advice}])."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    on_autoattack_images: dict[str, float] = field(default_factory=dict)
    failures: dict[str, Exception] = field(default_factory=dict)
    warnings: list[dict[str, str]] = field(default_factory=list)


def final_report(
    model: nn.Module,
    test: ImageDataset,
    *,
    epsilon: float,
    step_size: float,
    pgd_steps: int,
    run_autoattack: bool,
    batch_size: int,
    device,
    seed: int,
    autoattack_index: torch.Tensor | None = None,
    name: str = "model",
    callbacks: TrainingCallbacks | None = None,
    tracker: EvaluationTracker | None = None,
) -> ModelReport:
    """Clean, FGSM and PGD-`pgd_steps` accuracy on `test`, then AutoAttack on `test[autoattack_index]` (None:
    all of it), overall and per class. A failed attack costs only its own figures: the others still run.
    `name` labels the progress events and warnings (e.g. "student"); `tracker` follows the whole evaluation
    (default: this model's alone)."""
    aa_test = test if autoattack_index is None else test.subset(autoattack_index)
    first_pass = first_pass_label(pgd_steps)
    if tracker is None:
        planned = planned_work([name], len(test), pgd_steps, len(aa_test) if run_autoattack else None, len(test.classes))
        tracker = EvaluationTracker(callbacks or TrainingCallbacks(), planned)
    report = ModelReport()
    pgd_name = pgd_key(pgd_steps)
    attacks = {CLEAN_KEY: None, FGSM_KEY: fgsm_attack(epsilon), pgd_name: pgd_attack(epsilon, step_size, pgd_steps)}
    predicted: dict[str, torch.Tensor] = {}
    try:
        with tracker.stage(name, first_pass, math.ceil(len(test) / batch_size), len(test)) as progress:
            predicted = predictions(
                model,
                test,
                attacks,
                batch_size=batch_size,
                device=device,
                on_batch=lambda batch, batches, so_far: progress(batch, batches, so_far[pgd_name]),
            )
        report.warnings = outcome_warnings(name, predicted[CLEAN_KEY], test)
    except TrainingCancelled:
        raise
    except Exception as err:
        report.failures[first_pass] = err
    fault_point("final-evaluation")
    autoattack_predicted = None
    if run_autoattack:
        try:
            with tracker.stage(name, "AutoAttack", math.ceil(len(aa_test) / batch_size), len(aa_test)) as progress:
                autoattack_predicted = autoattack_predictions(
                    model, aa_test, epsilon=epsilon, batch_size=batch_size, device=device, seed=seed, on_batch=progress
                )
        except TrainingCancelled:
            raise
        except Exception as err:
            report.failures["AutoAttack"] = err
    report.metrics = {key: accuracy(p, test.labels) for key, p in predicted.items()}
    report.per_class = {key: per_class_accuracy(p, test) for key, p in predicted.items()}
    if autoattack_predicted is not None:
        report.metrics[AUTOATTACK_KEY] = accuracy(autoattack_predicted, aa_test.labels)
        report.per_class[AUTOATTACK_KEY] = per_class_accuracy(autoattack_predicted, aa_test)
        if predicted and len(aa_test) < len(test):
            report.on_autoattack_images = {key: accuracy(p[autoattack_index], aa_test.labels) for key, p in predicted.items()}
            report.on_autoattack_images[AUTOATTACK_KEY] = report.metrics[AUTOATTACK_KEY]
    report.warnings += attack_order_warnings(name, report, len(test), len(aa_test))
    return report


def per_class_accuracy(predicted: torch.Tensor, dataset: ImageDataset) -> dict[str, float]:
    """{class name: accuracy on that class's images}, for the classes that have images here."""
    result = {}
    for label, class_name in enumerate(dataset.classes):
        members = dataset.labels == label
        if members.any():
            result[class_name] = accuracy(predicted[members], dataset.labels[members])
    return result


# --- honest outcomes ------------------------------------------------------------------------

CHANCE_STANDARD_ERRORS = 2  # clean accuracy within this many binomial standard errors of 1/C counts as chance
SINGLE_CLASS_SHARE = 0.95  # a model giving one class to this share of the images (more than its labels hold) has collapsed
ADVICE = (
    "train for more epochs; lower ε (epsilon=4/255 often trains where 8/255 does not); on a small dataset start from "
    "the small-data preset (a small network, λ1 = 0.5 so the student also learns the labels); "
    "and check that the labels match the images"
)


def outcome_warnings(name: str, predicted: torch.Tensor, test: ImageDataset) -> list[dict[str, str]]:
    """Warnings for a model no better than chance on clean `test` images (its clean predictions), or one
    that predicts nearly a single class."""
    num_classes, n = len(test.classes), len(test)
    if n == 0:
        return []
    counts = torch.bincount(predicted, minlength=num_classes)
    correct = int((predicted == test.labels).sum())
    chance = 1 / num_classes
    margin = CHANCE_STANDARD_ERRORS * math.sqrt(chance * (1 - chance) / n)
    warnings = []
    if correct / n <= chance + margin:
        warnings.append(
            {
                "model": name,
                "kind": "chance",
                "advice": ADVICE,
                "message": f"the {name} is at chance: {correct / n:.1%} clean accuracy on {n} test images, where guessing "
                f"among {num_classes} classes gets {chance:.1%} (± {margin:.1%} with {n} images)",
            }
        )
    top = int(counts.argmax())
    share, label_share = counts[top].item() / n, (test.labels == top).float().mean().item()
    if share >= SINGLE_CLASS_SHARE and share > label_share:
        warnings.append(
            {
                "model": name,
                "kind": "single_class",
                "advice": ADVICE,
                "message": f"the {name} predicts class '{test.classes[top]}' for {share:.0%} of the {n} test images "
                f"({label_share:.0%} of them belong to it)",
            }
        )
    return warnings


ORDER_ADVICE = (
    "trust the lower figure: a stronger attack that does worse than a weaker one on the same images points to gradient "
    "masking (the model's gradients mislead the attacks) or to too few images; evaluate on more test images, and do not "
    "rely on the gradient attacks' figures for this model"
)


def attack_order_warnings(name: str, report: ModelReport, n_test: int, n_autoattack: int) -> list[dict[str, str]]:
    """A warning for each stronger attack that reports a higher accuracy than a weaker one on the same images
    (clean ≥ FGSM ≥ PGD ≥ AutoAttack): the figures then cannot all be right."""
    pgd_name = next((k for k in report.metrics if re.fullmatch(r"pgd\d+_acc", k)), None)
    chains = [(report.metrics, n_test, [CLEAN_KEY, FGSM_KEY, pgd_name])]
    if n_autoattack == n_test:
        chains[0][2].append(AUTOATTACK_KEY)
    elif report.on_autoattack_images:
        chains.append((report.on_autoattack_images, n_autoattack, [pgd_name, AUTOATTACK_KEY]))
    warnings = []
    for figures, n, order in chains:
        present = [k for k in order if k is not None and k in figures]
        for weaker, stronger in itertools.pairwise(present):
            if figures[stronger] > figures[weaker]:
                warnings.append(
                    {
                        "model": name,
                        "kind": "attack_order",
                        "advice": ORDER_ADVICE,
                        "message": f"on the same {n} test images, {metric_label(stronger)} leaves the {name} {figures[stronger]:.1%} "
                        f"accuracy, above the {figures[weaker]:.1%} of the weaker {metric_label(weaker)}",
                    }
                )
    return warnings


SUBSET_ADVICE = "for figures on the whole test split, leave evaluation.n_examples and evaluation.autoattack_n_examples unset (null)"


def subset_warning(n_test: int, n_evaluated: int, n_autoattack: int | None, seed: int) -> dict[str, str] | None:
    """The warning every report evaluated on part of its test split carries: which figures, how many images,
    how they were drawn, and the standard error that comes with it."""
    parts = []
    if n_evaluated < n_test:
        parts.append(f"every figure comes from {n_evaluated} of the {n_test} test images")
    if n_autoattack is not None and n_autoattack < n_evaluated:
        parts.append(f"AutoAttack's from {n_autoattack} of {'them' if parts else f'the {n_test} test images'}")
    if not parts:
        return None
    smallest = min(n for n in (n_evaluated, n_autoattack) if n is not None)
    return {
        "model": "evaluation",
        "kind": "subset",
        "advice": SUBSET_ADVICE,
        "message": "; ".join(parts)
        + f" (a class-stratified sample drawn with seed {seed}, the same images for every model and attack that ran on it); "
        f"with {smallest} images an accuracy has a standard error of up to {50 / math.sqrt(max(1, smallest)):.1f} points",
    }
