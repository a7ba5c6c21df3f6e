"""How a class is split: how many of its images are held out (for validation, or a folder upload's
test set). Needs no torch, so the upload check and the engine split alike."""

from __future__ import annotations


def held_out_count(class_size: int, fraction: float) -> int:
    """`fraction` of the class, rounded, but at least 1 and never all of it; none of a class of 0 or 1."""
    return min(class_size - 1, max(1, round(fraction * class_size))) if class_size > 1 else 0
