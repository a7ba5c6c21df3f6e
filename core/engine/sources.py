"""Where datasets come from: the built-in offline digits, CIFAR-10/100 (torchvision), TinyImageNet
(its standard folder layout) and user files (the core/engine/dataset_files package), resolved by name or path
into train / validation / test splits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .builtin_datasets import BUILTIN_DATASETS
from .dataset_files.tensors import load_dataset_file
from .datasets import DatasetError, DatasetSplits, ImageDataset, fingerprint, split_validation

BUILTIN_DATA_DIR = Path(__file__).parent / "builtin_data"
SELECTIONS = ("validation", "test")


def load_digits(size: int = 16, test_fraction: float = 0.2) -> tuple[ImageDataset, ImageDataset]:
    """The offline dataset: 1,797 digits upscaled bilinearly from 8×8, a fixed 80/20 train/test split."""
    with gzip.open(BUILTIN_DATA_DIR / "digits.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.from_numpy(table[:, 64].astype(np.int64))
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(len(labels) * test_fraction)
    classes = [str(d) for d in range(10)]
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return ImageDataset(images[train], labels[train], classes), ImageDataset(images[test], labels[test], classes)


def load_cifar(name: str, root: Path, download: bool) -> tuple[ImageDataset, ImageDataset]:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    folder = root / name
    try:
        parts = [cls(str(folder), train=train, download=download) for train in (True, False)]
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(
            f"{name} not found in {folder}: put the extracted '{cls.base_folder}' folder there "
            f"(from {cls.url}), or allow downloading. ({err})"
        ) from err
    except OSError as err:  # no network
        raise DatasetError(f"{name} could not be downloaded ({err}); put the extracted '{cls.base_folder}' folder in {folder}") from err
    train, test = (
        ImageDataset(
            torch.from_numpy(np.ascontiguousarray(part.data.transpose(0, 3, 1, 2))),
            torch.tensor(part.targets, dtype=torch.int64),
            list(part.classes),
        )
        for part in parts
    )
    return train, test


def load_tinyimagenet(root: Path) -> tuple[ImageDataset, ImageDataset]:
    """The standard tiny-imagenet-200 layout: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(
            f"tinyimagenet not found: expected {wnids_file}; extract tiny-imagenet-200.zip "
            f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip) into {root}"
        )
    wnids = wnids_file.read_text().split()
    index = {w: i for i, w in enumerate(wnids)}

    def read(paths: list[Path], labels: list[int]) -> ImageDataset:
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        return ImageDataset(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.tensor(labels), wnids)

    train_paths, train_labels = [], []
    for wnid in wnids:
        for p in sorted((folder / "train" / wnid / "images").glob("*.JPEG")):
            train_paths.append(p)
            train_labels.append(index[wnid])
    val_paths, val_labels = [], []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        file_name, wnid = line.split("\t")[:2]
        val_paths.append(folder / "val" / "images" / file_name)
        val_labels.append(index[wnid])
    # TinyImageNet's test labels are not public: its labelled val set is the test set, as in the paper.
    return read(train_paths, train_labels), read(val_paths, val_labels)


def load_splits(
    dataset: str,
    *,
    data_root: Path = Path("data"),
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    selection: str = "validation",
    resize: tuple[int, int] | None = None,
    name: str | None = None,
    dataset_id: str | None = None,
) -> DatasetSplits:
    """Resolve a built-in name or a dataset file path into train/val/test splits, named `name` (default: the
    built-in's name or the file's) and, for an upload, with the service's `dataset_id`.

    selection "validation" holds `val_fraction` of the training data out for model selection;
    "test" (the paper protocol) keeps all training data and selects on the test set."""
    if selection not in SELECTIONS:
        raise DatasetError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if dataset == "digits":
        train, test = load_digits()
    elif dataset in ("cifar10", "cifar100"):
        train, test = load_cifar(dataset, Path(data_root), download)
    elif dataset == "tinyimagenet":
        train, test = load_tinyimagenet(Path(data_root))
    else:
        path = Path(dataset)
        if not path.is_file():
            raise DatasetError(f"dataset '{dataset}' is neither a built-in ({', '.join(BUILTIN_DATASETS)}) nor an existing file")
        train, test = load_dataset_file(path, resize=resize)  # (height, width), as the upload was validated
    data_fingerprint = fingerprint(train, test)
    train, val = split_validation(train, val_fraction, seed) if selection == "validation" else (train, test)
    name = name or (dataset if dataset in BUILTIN_DATASETS else Path(dataset).name)
    return DatasetSplits(name, train, val, test, data_fingerprint, selection, dataset_id)
