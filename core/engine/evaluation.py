"""Clean and robust accuracy: per-epoch validation (clean + PGD-10) and the final report
(clean, FGSM, PGD-20, AutoAttack). Models are evaluated in eval mode, in large batches."""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch
from torch import nn

from .attacks import AutoAttackSet, autoattack, fgsm, pgd
from .datasets import ImageDataset
from .errors import TrainingCancelled
from .faults import fault_point

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

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
    """"PGD-20" for pgd20_acc; "Clean", "FGSM", "AutoAttack"; the key itself when unknown."""
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


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).argmax(1) == y).sum()


def accuracies(
    model: nn.Module,
    dataset: ImageDataset,
    attacks: dict[str, Attack | None],
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy of `model` on `dataset` under each attack (None = clean), in one pass over the data."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = {name: torch.zeros((), dtype=torch.int64, device=device) for name in attacks}
    for x, y in _batches(dataset, batch_size, device, _memory_format(model)):
        for name, attack in attacks.items():
            correct[name] += _correct(model, x if attack is None else attack(model, x, y), y)
    model.train(was_training)
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
        model, dataset, {CLEAN_KEY: None, VALIDATION_PGD_KEY: pgd_attack(epsilon, step_size, steps)},
        batch_size=batch_size, device=device,
    )


def autoattack_accuracy(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    epsilon: float,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Robust accuracy under AutoAttack, L∞ (pyautoattack), with the attack set `AutoAttackSet` chooses
    for the dataset's number of classes: the standard version from 10 classes on."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    adversary = autoattack(model, AutoAttackSet(len(dataset.classes)), epsilon=epsilon, device=device, seed=seed)
    x = dataset.images.to(device).float().div_(255)
    y = dataset.labels.to(device)
    _x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    model.train(was_training)
    return (y_adv == y).float().mean().item()


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
    on_phase: Callable[[str], None] = lambda phase: None,
) -> tuple[dict[str, float], dict[str, Exception]]:
    """The model's test metrics (report_keys order), and the attacks that raised instead: {attack: error}.

    A failed attack costs only its own figures: the others still run."""
    report: dict[str, float] = {}
    failures: dict[str, Exception] = {}
    first_pass = f"clean, FGSM, PGD-{pgd_steps}"
    on_phase(first_pass)
    attacks = {CLEAN_KEY: None, FGSM_KEY: fgsm_attack(epsilon), pgd_key(pgd_steps): pgd_attack(epsilon, step_size, pgd_steps)}
    try:
        report.update(accuracies(model, test, attacks, batch_size=batch_size, device=device))
    except TrainingCancelled:
        raise
    except Exception as err:
        failures[first_pass] = err
    fault_point("final-evaluation")
    if run_autoattack:
        on_phase("AutoAttack")
        try:
            report[AUTOATTACK_KEY] = autoattack_accuracy(
                model, test, epsilon=epsilon, batch_size=batch_size, device=device, seed=seed
            )
        except TrainingCancelled:
            raise
        except Exception as err:
            failures["AutoAttack"] = err
    return report, failures
