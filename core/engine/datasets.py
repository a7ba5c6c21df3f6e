"""Datasets as in-memory uint8 tensors: images N×C×H×W, labels int64 N, class names; and the
train / validation / test splits a job uses.

Every source (built-in digits, CIFAR, TinyImageNet, user archives and .npz files) is turned
into an `ImageDataset`. Inputs reach models as floats in [0, 1]; there is no normalisation
layer, as in the reference script.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DatasetError
from .fingerprints import fingerprint
from .splits import held_out_count

__all__ = ["DatasetError", "DatasetSplits", "ImageDataset", "fingerprint", "split_validation", "stratified_sample"]


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8, N×C×H×W
    labels: torch.Tensor  # int64, N
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"images must be a uint8 N×C×H×W tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DatasetError(
                f"labels must be int64 of shape ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, index: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.classes)


@dataclass
class DatasetSplits:
    """Train (for optimisation), validation (for model selection) and test (for the final report).

    With selection "test" (the paper protocol) `val` is the test set and `train` all training data."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    fingerprint: str  # of the data as given (`fingerprint(training data, test)`, before the validation split): the API's
    selection: str = "validation"
    dataset_id: str | None = None  # the service's id of an uploaded dataset

    @property
    def split_fingerprint(self) -> str:
        """The fingerprint of the three splits, which checkpoints of earlier versions recorded."""
        return fingerprint(self.train, self.val, self.test)

    def matches(self, recorded: str) -> bool:
        """Whether a checkpoint's recorded fingerprint is of this data (this version's, or an earlier one's)."""
        return recorded == self.fingerprint or recorded == self.split_fingerprint

    @property
    def protocol(self) -> str:
        """How the reported models were chosen, in words for the model card."""
        if self.selection == "test":
            return (
                "paper protocol, as the authors' script: trained on the whole training set, best epoch selected "
                "on the test set, so the test accuracies of the selected models are not held-out estimates"
            )
        return (
            f"best epoch selected on {len(self.val)} validation images held out from the training data; "
            "the test set is used only for the final report"
        )

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape


def split_validation(train: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Carve a class-stratified validation split out of the training data."""
    if not 0 < fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    val_per_class: list[torch.Tensor] = []
    for label in range(train.num_classes):
        members = torch.nonzero(train.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = held_out_count(len(members), fraction)
        val_per_class.append(members[:n_val])
    val_index = torch.cat(val_per_class).sort().values
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_index] = False
    return train.subset(torch.nonzero(keep).flatten()), train.subset(val_index)


def stratified_counts(class_sizes: list[int], n: int) -> list[int]:
    """How many of `n` images to take from classes of these sizes: one from every non-empty class while `n`
    allows, the rest in proportion to what each class has left (largest remainders; ties to the lower class)."""
    n = max(0, min(n, sum(class_sizes)))
    present = [c for c, size in enumerate(class_sizes) if size]
    counts = [1 if size and n >= len(present) else 0 for size in class_sizes]
    spare = [size - k for size, k in zip(class_sizes, counts, strict=True)]
    budget = n - sum(counts)
    if budget:
        quotas = [budget * s / sum(spare) for s in spare]
        extra = [int(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda c: (extra[c] - quotas[c], c))
        for c in by_remainder[: budget - sum(extra)]:
            extra[c] += 1
        counts = [k + e for k, e in zip(counts, extra, strict=True)]
    return counts


def stratified_sample(dataset: ImageDataset, n: int, seed: int) -> torch.Tensor:
    """The indices (ascending) of a seeded, class-stratified sample of `n` of the dataset's images: each class
    as `stratified_counts` allots, drawn at random within the class. The whole dataset when `n` covers it.

    A sample, never the first `n`: a folder dataset's test split is sorted by class, and its first images
    are one or two classes."""
    if n >= len(dataset):
        return torch.arange(len(dataset))
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(dataset.labels == c).flatten() for c in range(dataset.num_classes)]
    counts = stratified_counts([len(m) for m in members], n)
    chosen = [m[torch.randperm(len(m), generator=generator)[:k]] for m, k in zip(members, counts, strict=True)]
    return torch.cat(chosen).sort().values
