"""The final report's shape, torch-free: its metric keys in report order and their labels, the models' labels,
and per-class tables. The engine writes reports with these keys; every reader (the model card, the engine's
CLI, the web page, the demo) takes keys and labels from here."""

from __future__ import annotations

import re
from typing import Any

# the metric keys, in report order
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


MODEL_LABELS = {"student": "Student", "swa_student": "SWA student", "last_student": "Student of the last epoch"}


PerClassRow = tuple[str, Any, Any, list[Any]]  # (class, its test images, AutoAttack's where it ran on fewer, else None, accuracies)


def per_class_table(model_metrics: dict[str, Any], evaluation: dict[str, Any]) -> tuple[list[str], list[PerClassRow]]:
    """One model's per-class figures as (metric keys, rows); no rows where the report has none. The card and
    the web page both render it."""
    by_metric = model_metrics.get("test_per_class") or {}
    counts = (evaluation.get("sample") or {}).get("per_class") or {}
    evaluated, autoattack = counts.get("evaluated") or {}, counts.get("autoattack") or {}
    autoattack_fewer = AUTOATTACK_KEY in by_metric and autoattack != evaluated
    rows = [
        (name, evaluated.get(name, "–"), autoattack.get(name, 0) if autoattack_fewer else None, [by_metric[k].get(name) for k in by_metric])
        for name in dict.fromkeys(c for figures in by_metric.values() for c in figures)
    ]
    return list(by_metric), rows
