"""`ArrayDataset`: what the file readers produce, as numpy arrays (uint8 N×C×H×W images, int64 labels,
class names), so a file can be read and checked without torch; `tensors` wraps them for training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    images: np.ndarray  # uint8, N×C×H×W
    labels: np.ndarray  # int64, N
    classes: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))
