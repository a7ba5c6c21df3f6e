"""A dataset file loaded as the engine's torch datasets: the arrays the readers produce, wrapped
(`torch.from_numpy`, no copy). The one module of the package that imports torch."""

from __future__ import annotations

from pathlib import Path

import torch

from ..datasets import ImageDataset
from .arrays import ArrayDataset
from .inspection import read_dataset_file
from .limits import DEFAULT_LIMITS, FileLimits


def load_dataset_file(
    path: Path, limits: FileLimits = DEFAULT_LIMITS, *, resize: tuple[int, int] | None = None
) -> tuple[ImageDataset, ImageDataset]:
    """Returns (train, test). `resize`: (height, width) every image is resized to, or None."""
    _fmt, train, test = read_dataset_file(path, limits, resize=resize)
    return _tensors(train), _tensors(test)


def _tensors(dataset: ArrayDataset) -> ImageDataset:
    return ImageDataset(torch.from_numpy(dataset.images), torch.from_numpy(dataset.labels), dataset.classes)
