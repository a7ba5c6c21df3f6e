"""Human-readable job progress: one-line descriptions and a tqdm bar driven by job snapshots."""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "-"


def epoch_text(job: dict[str, Any]) -> str | None:
    p = job.get("progress") or {}
    if p.get("epoch") is None or not p.get("epochs"):
        return None
    return f"epoch {p['epoch']}/{p['epochs']}"


def progress_text(job: dict[str, Any]) -> str:
    """ "done" only for a job that succeeded; "failed at 60%" for one that did not; the fraction while it runs."""
    fraction = (job.get("progress") or {}).get("fraction") or 0.0
    if job["status"] == "succeeded":
        return "done"
    if job["status"] in TERMINAL_STATUSES:
        return f"{job['status']} at {fraction:.0%}"
    return f"{fraction:.0%}"


def describe_progress(job: dict[str, Any]) -> str:
    """`epoch 3/12 · 812 img/s · ETA 1m20s · clean 82.0% · PGD 48.0%`: what is known so far, the
    phase instead of the epoch outside training; clean and PGD are the student's latest validation accuracies."""
    p = job.get("progress") or {}
    parts = []
    evaluation = p.get("evaluation")
    if job["status"] == "running" and (epoch := epoch_text(job)):
        parts.append(epoch)
    elif job["status"] == "evaluating" and evaluation:
        parts.append(f"evaluating {evaluation['model']}: {evaluation['attack']} {evaluation['batch']}/{evaluation['batches']}")
        if evaluation.get("accuracy_so_far") is not None:
            parts.append(f"accuracy so far {percent(evaluation['accuracy_so_far'])}")
        if evaluation.get("eta_seconds") is not None:
            parts.append(f"ETA {format_duration(evaluation['eta_seconds'])}")
    elif job.get("phase") and job["phase"] != job["status"]:
        parts.append(job["phase"])
    if p.get("images_per_sec"):
        parts.append(f"{p['images_per_sec']:.0f} img/s")
    if job["status"] == "running" and p.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(p['eta_seconds'])}")
    student = (job.get("latest_metrics") or {}).get("student") or {}
    if "clean_acc" in student:
        parts.append(f"clean {percent(student['clean_acc'])}")
    if "pgd_acc" in student:
        parts.append(f"PGD {percent(student['pgd_acc'])}")
    return " · ".join(parts)


class JobProgressBar:
    """A bar over the job's completed fraction, with the service's own epoch, speed and ETA as text
    (tqdm's rate and remaining time would measure snapshots, not training)."""

    def __init__(self, job_id: str, file: TextIO | None = None):
        from tqdm import tqdm

        self._bar = tqdm(
            total=100,
            desc=job_id,
            file=file or sys.stderr,
            leave=True,
            bar_format="{percentage:3.0f}%|{bar:20}| {desc}",
        )

    def update(self, job: dict[str, Any]) -> None:
        fraction = 1.0 if job["status"] == "succeeded" else float((job.get("progress") or {}).get("fraction") or 0.0)
        self._bar.n = round(100 * min(max(fraction, 0.0), 1.0), 1)
        details = describe_progress(job)
        status = job["status"].upper() if job["status"] in ("failed", "cancelled") else job["status"]  # never read as done
        self._bar.set_description_str(f"{job['id']} {status}" + (f" · {details}" if details else ""))

    def close(self) -> None:
        self._bar.close()
