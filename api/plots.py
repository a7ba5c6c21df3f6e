"""Training curves of a job as a PNG: validation accuracy, training losses and learning rate per epoch."""

from __future__ import annotations

import io
import math
import threading
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure

_lock = threading.Lock()  # Matplotlib is not thread-safe (shared font and text caches); routes render in a threadpool
METRICS = (("clean_acc", "clean", "#2563eb"), ("pgd_acc", "PGD", "#dc2626"))
MODELS = (("student", "student", "-"), ("swa_student", "SWA student", "--"))


def _value(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def training_curves_png(records: list[dict[str, Any]], title: str = "") -> bytes:
    """records: the job's epoch_metrics records ({epoch, lr, losses, student, swa_student}), in any order."""
    with _lock:
        return _render(sorted(records, key=lambda r: r["epoch"]), title)


def _render(records: list[dict[str, Any]], title: str) -> bytes:
    figure = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    if title:
        figure.suptitle(title, fontsize=11, color="#374151")
    if not records:
        axes = figure.add_subplot()
        axes.set_axis_off()
        axes.text(
            0.5,
            0.5,
            "No epochs yet: curves appear after the first epoch",
            ha="center",
            va="center",
            fontsize=15,
            color="#6b7280",
            transform=axes.transAxes,
        )
        return _png(figure)

    epochs = [r["epoch"] for r in records]
    accuracy, losses, lr = figure.subplots(1, 3)

    for key, label, style in MODELS:
        for metric, name, color in METRICS:
            values = [_value((r.get(key) or {}).get(metric)) * 100 for r in records]
            if not all(math.isnan(v) for v in values):
                accuracy.plot(epochs, values, style, marker="o", markersize=3, color=color, label=f"{label} {name}")
    _style(accuracy, "Validation accuracy (%)")
    accuracy.set_ylim(bottom=0)

    names = sorted({k for r in records for k in r.get("losses") or {} if k.startswith("loss")})
    for name in names:
        losses.plot(epochs, [_value((r.get("losses") or {}).get(name)) for r in records], marker="o", markersize=3, label=name)
    _style(losses, "Training loss")

    rates = [_value(r.get("lr")) for r in records]
    lr.plot(epochs, rates, marker="o", markersize=3, color="#7c3aed")
    if any(v > 0 for v in rates):
        lr.set_yscale("log")
    _style(lr, "Learning rate", legend=False)
    if len(epochs) == 1:  # matplotlib would otherwise span ±0.05 around a lone point
        for axes in (accuracy, losses, lr):
            axes.set_xlim(epochs[0] - 1, epochs[0] + 1)
    return _png(figure)


def _style(axes, title: str, legend: bool = True) -> None:
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("epoch")
    axes.grid(True, alpha=0.3)
    axes.xaxis.get_major_locator().set_params(integer=True)
    if legend and axes.lines:
        axes.legend(fontsize=8, frameon=False)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()
