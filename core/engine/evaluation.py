"""Clean and robust accuracy: per-epoch validation (clean + PGD-10) and the final report
(clean, FGSM, PGD-20, AutoAttack) with its progress and its warnings. Models are evaluated in eval
mode, in large batches."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .attacks import AutoAttackSet, autoattack, fgsm, pgd
from .callbacks import EvaluationProgress, TrainingCallbacks
from .datasets import ImageDataset
from .errors import TrainingCancelled
from .faults import fault_point
from .methods import eval_mode

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
OnBatch = Callable[[int, int, float], None]  # (batches done, batches, accuracy so far)

# The final report's metric keys, in report order; every reader (card, CLI, UI, demo) takes them from here.
CLEAN_KEY = "clean_acc"
FGSM_KEY = "fgsm_acc"
AUTOATTACK_KEY = "autoattack_acc"
VALIDATION_PGD_KEY = "pgd_acc"  # per-epoch validation: PGD with the spec's eval_pgd_steps


def pgd_key(steps: int) -> str:
    return f"pgd{steps}_acc"


def report_keys(pgd_steps: int, autoattack: bool) -> list[str]:
    """The test metrics a final report holds: clean, FGSM, PGD-`pgd_steps` and (if run) AutoAttack."""
    return [CLEAN_KEY, FGSM_KEY, pgd_key(pgd_steps)] + ([AUTOATTACK_KEY] if autoattack else [])


def metric_label(key: str) -> str:
    """ "PGD-20" for pgd20_acc; "Clean", "FGSM", "AutoAttack"; the key itself when unknown."""
    fixed = {CLEAN_KEY: "Clean", FGSM_KEY: "FGSM", AUTOATTACK_KEY: "AutoAttack", VALIDATION_PGD_KEY: "PGD"}
    if key in fixed:
        return fixed[key]
    match = re.fullmatch(r"pgd(\d+)_acc", key)
    return f"PGD-{match.group(1)}" if match else key


def _batches(dataset: ImageDataset, batch_size: int, device: torch.device, memory_format: torch.memory_format):
    for start in range(0, len(dataset), batch_size):
        x = dataset.images[start : start + batch_size].to(device, non_blocking=True).float().div_(255)
        yield x.contiguous(memory_format=memory_format), dataset.labels[start : start + batch_size].to(device, non_blocking=True)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """Feed inputs in the layout the model's convolutions are in (channels_last on the fast GPU path)."""
    conv = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels_last = conv is not None and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def accuracies(
    model: nn.Module,
    dataset: ImageDataset,
    attacks: dict[str, Attack | None],
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Accuracy of `model` on `dataset` under each attack (None = clean), in one pass over the data;
    `on_batch(batches done, batches, accuracies so far)` after each batch."""
    device = torch.device(device)
    batches = math.ceil(len(dataset) / batch_size)
    correct = {name: torch.zeros((), dtype=torch.int64, device=device) for name in attacks}
    seen = 0
    with eval_mode(model):
        for batch, (x, y) in enumerate(_batches(dataset, batch_size, device, _memory_format(model)), 1):
            for name, attack in attacks.items():
                adversarial = x if attack is None else attack(model, x, y)
                with torch.no_grad():
                    correct[name] += (model(adversarial).argmax(1) == y).sum()
            seen += len(y)
            if on_batch is not None:
                on_batch(batch, batches, {name: c.item() / seen for name, c in correct.items()})
    return {name: c.item() / max(1, len(dataset)) for name, c in correct.items()}


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


def autoattack_accuracy(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    epsilon: float,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_batch: OnBatch | None = None,
) -> float:
    """Robust accuracy under AutoAttack, L∞ (pyautoattack), with the attack set `AutoAttackSet` chooses
    for the dataset's number of classes: the standard version from 10 classes on.

    pyautoattack runs on `batch_size` images at a time, each call exactly as pyautoattack on those images
    alone, so that `on_batch` can report progress; with at most `batch_size` images it is a single call.
    The price: the attacks after APGD-CE run on each batch's survivors, in smaller batches than one call
    would gather (on a CPU with a small model, 2 batches of 25 took 1.6× as long as 1 of 50)."""
    device = torch.device(device)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    adversary = autoattack(model, AutoAttackSet(len(dataset.classes)), epsilon=epsilon, device=device, seed=seed)
    batches = math.ceil(len(dataset) / batch_size)
    robust = seen = 0
    with eval_mode(model):
        for batch, start in enumerate(range(0, len(dataset), batch_size), 1):
            x = dataset.images[start : start + batch_size].to(device).float().div_(255)
            y = dataset.labels[start : start + batch_size].to(device)
            _x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            robust += int((y_adv == y).sum())
            seen += len(y)
            if on_batch is not None:
                on_batch(batch, batches, robust / seen)
    return robust / max(1, len(dataset))


class _Progress:
    """EvaluationProgress events for one model under one attack, with an ETA from the pace so far;
    a cancelled job stops here, between batches."""

    def __init__(self, callbacks: TrainingCallbacks, model: str, attack: str, batches: int):
        self.callbacks, self.model, self.attack, self.batches = callbacks, model, attack, batches
        self.started = time.perf_counter()
        self(0, batches, None)

    def __call__(self, batch: int, batches: int, accuracy: float | None) -> None:
        if self.callbacks.should_stop():
            raise TrainingCancelled(f"cancelled while evaluating the {self.model} ({self.attack})")
        eta = (time.perf_counter() - self.started) / batch * (batches - batch) if batch else None
        self.callbacks.on_evaluation(EvaluationProgress(self.model, self.attack, batch, batches, accuracy, eta))


@dataclass
class ModelReport:
    """One model's final report: its test metrics (report_keys order), the attacks that raised instead
    ({attack: error}), and warnings about the outcome ([{model, kind, message, advice}])."""

    metrics: dict[str, float] = field(default_factory=dict)
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
    autoattack_images: int | None = None,
    name: str = "model",
    callbacks: TrainingCallbacks | None = None,
) -> ModelReport:
    """Clean, FGSM and PGD-`pgd_steps` accuracy on `test`, then AutoAttack on its first `autoattack_images`
    images (None: all). A failed attack costs only its own figures: the others still run. `name` labels
    the progress events and warnings (e.g. "student")."""
    callbacks = callbacks or TrainingCallbacks()
    report = ModelReport()
    first_pass = f"clean, FGSM, PGD-{pgd_steps}"
    pgd_name = pgd_key(pgd_steps)
    attacks = {CLEAN_KEY: None, FGSM_KEY: fgsm_attack(epsilon), pgd_name: pgd_attack(epsilon, step_size, pgd_steps)}
    try:
        progress = _Progress(callbacks, name, first_pass, math.ceil(len(test) / batch_size))
        report.metrics.update(
            accuracies(
                model,
                test,
                attacks,
                batch_size=batch_size,
                device=device,
                on_batch=lambda batch, batches, so_far: progress(batch, batches, so_far[pgd_name]),
            )
        )
        report.warnings = outcome_warnings(name, model, test, batch_size=batch_size, device=device)
    except TrainingCancelled:
        raise
    except Exception as err:
        report.failures[first_pass] = err
    fault_point("final-evaluation")
    if run_autoattack:
        aa_test = test if autoattack_images is None else test.subset(torch.arange(min(autoattack_images, len(test))))
        try:
            progress = _Progress(callbacks, name, "AutoAttack", math.ceil(len(aa_test) / batch_size))
            report.metrics[AUTOATTACK_KEY] = autoattack_accuracy(
                model, aa_test, epsilon=epsilon, batch_size=batch_size, device=device, seed=seed, on_batch=progress
            )
        except TrainingCancelled:
            raise
        except Exception as err:
            report.failures["AutoAttack"] = err
    return report


# --- honest outcomes ------------------------------------------------------------------------

CHANCE_STANDARD_ERRORS = 2  # clean accuracy within this many binomial standard errors of 1/C counts as chance
SINGLE_CLASS_SHARE = 0.95  # a model giving one class to this share of the images (more than its labels hold) has collapsed
ADVICE = (
    "train for more epochs; lower ε (epsilon=4/255 often trains where 8/255 does not); on a small dataset start from "
    "the small-data preset (a small network, λ1 = 0.5 so the student also learns the labels); "
    "and check that the labels match the images"
)


@torch.no_grad()
def outcome_warnings(name: str, model: nn.Module, test: ImageDataset, *, batch_size: int, device) -> list[dict[str, str]]:
    """Warnings for a model no better than chance on clean `test` images, or one that predicts nearly a single class."""
    num_classes, n = len(test.classes), len(test)
    if n == 0:
        return []
    predictions = torch.zeros(num_classes, dtype=torch.int64)
    correct = 0
    with eval_mode(model):
        for x, y in _batches(test, batch_size, torch.device(device), _memory_format(model)):
            predicted = model(x).argmax(1)
            predictions += torch.bincount(predicted.cpu(), minlength=num_classes)
            correct += int((predicted == y).sum())
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
    top = int(predictions.argmax())
    share, label_share = predictions[top].item() / n, (test.labels == top).float().mean().item()
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
