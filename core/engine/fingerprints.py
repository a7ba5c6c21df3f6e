"""The dataset fingerprint: one sha256 over each part's shape, class names, pixels and labels, so the
same data gives the same id anywhere (at upload, in the worker, in a checkpoint). Needs no torch: it
hashes numpy arrays or CPU tensors where they lie, without copying them."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np


class _Dataset(Protocol):
    @property
    def images(self) -> Any: ...  # uint8 N×C×H×W: a numpy array or a CPU tensor

    @property
    def labels(self) -> Any: ...  # int64 N, likewise

    @property
    def classes(self) -> list[str]: ...


def fingerprint(*datasets: _Dataset) -> str:
    """sha256 over images, labels and class names (a dataset's is that of its training and test data, as the
    API shows it at upload)."""
    digest = hashlib.sha256()
    for dataset in datasets:
        images, labels = np.ascontiguousarray(dataset.images), np.ascontiguousarray(dataset.labels)
        digest.update(repr((tuple(images.shape), dataset.classes)).encode())
        digest.update(images.data)
        digest.update(labels.data)
    return digest.hexdigest()
