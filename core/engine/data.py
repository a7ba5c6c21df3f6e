"""Datasets as in-memory uint8 tensors, and the batch loader that augments on the device.

Every source (built-in digits, CIFAR, TinyImageNet, user archives and .npz files) is turned
into an `ImageDataset`: images uint8 N×C×H×W, labels int64 N. Inputs reach models as floats
in [0, 1]; there is no normalisation layer, as in the reference script.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BUILTIN_DATA_DIR = Path(__file__).parent / "builtin_data"


class DatasetError(ValueError):
    """A dataset could not be loaded; the message names the file, folder or field at fault."""


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8, N×C×H×W
    labels: torch.Tensor  # int64, N
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"images must be a uint8 N×C×H×W tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"labels must be int64 of shape ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, index: torch.Tensor) -> "ImageDataset":
        return ImageDataset(self.images[index], self.labels[index], self.classes)


@dataclass
class DatasetSplits:
    """Train (for optimisation), validation (for model selection) and test (for the final report)."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    fingerprint: str

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape


def fingerprint(*datasets: ImageDataset) -> str:
    """sha256 over images, labels and class names: the same data gives the same id anywhere."""
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(repr((tuple(dataset.images.shape), dataset.classes)).encode())
        digest.update(dataset.images.contiguous().numpy().tobytes())
        digest.update(dataset.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def split_validation(train: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Carve a class-stratified validation split out of the training data."""
    if not 0 < fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    val_index = []
    for label in range(train.num_classes):
        members = torch.nonzero(train.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        val_index.append(members[:n_val])
    val_index = torch.cat(val_index).sort().values
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_index] = False
    return train.subset(torch.nonzero(keep).flatten()), train.subset(val_index)


# --- sources -----------------------------------------------------------------------------

BUILTIN_DATASETS = {
    "digits": "scikit-learn's bundled 8×8 handwritten digits (UCI), upscaled to 16×16 grey; 10 classes, 1,797 images. Needs no network.",
    "cifar10": "CIFAR-10 via torchvision (32×32 RGB, 10 classes, 50,000 train / 10,000 test).",
    "cifar100": "CIFAR-100 via torchvision (32×32 RGB, 100 classes, 50,000 train / 10,000 test).",
    "tinyimagenet": "TinyImageNet-200 from its standard folder layout (64×64 RGB, 200 classes).",
}


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
        raise DatasetError(
            f"{name} could not be downloaded ({err}); put the extracted '{cls.base_folder}' folder in {folder}"
        ) from err
    return tuple(
        ImageDataset(
            torch.from_numpy(np.ascontiguousarray(part.data.transpose(0, 3, 1, 2))),
            torch.tensor(part.targets, dtype=torch.int64),
            list(part.classes),
        )
        for part in parts
    )


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
) -> DatasetSplits:
    """Resolve a built-in name or a dataset file path into train/val/test splits."""
    if dataset == "digits":
        train, test = load_digits()
    elif dataset in ("cifar10", "cifar100"):
        train, test = load_cifar(dataset, Path(data_root), download)
    elif dataset == "tinyimagenet":
        train, test = load_tinyimagenet(Path(data_root))
    else:
        from .dataset_files import load_dataset_file

        path = Path(dataset)
        if not path.is_file():
            raise DatasetError(
                f"dataset '{dataset}' is neither a built-in ({', '.join(BUILTIN_DATASETS)}) nor an existing file"
            )
        train, test = load_dataset_file(path)
    train, val = split_validation(train, val_fraction, seed)
    return DatasetSplits(dataset if dataset in BUILTIN_DATASETS else Path(dataset).name, train, val, test, fingerprint(train, val, test))


# --- batches -----------------------------------------------------------------------------


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad-`padding` zero-padded random crop plus horizontal flip, per sample, as batched tensor ops."""
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=device))[:, :, None]
    cols = dx[:, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    batch = torch.arange(n, device=device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class BatchLoader:
    """Yields (x float in [0,1], y) batches from an ImageDataset held on `device` as uint8.

    Training loaders shuffle and augment with a generator seeded per epoch, so an epoch's batches
    depend only on (seed, epoch): a resumed run sees exactly the batches it would have seen.
    Datasets too large for the device stay in host memory: `workers` threads gather the next
    batches into pinned buffers ahead of time, and each is copied to the device asynchronously.
    Augmentation always runs on the device, so both paths give the same batches.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        train: bool = False,
        padding: int = 4,
        seed: int = 0,
        keep_on_device: bool | None = None,
        channels_last: bool = False,
        workers: int = 4,
        prefetch: int = 6,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.padding = padding
        self.seed = seed
        self.channels_last = channels_last
        self.workers = workers
        self.prefetch = prefetch
        self.epoch = 0
        if keep_on_device is None:
            keep_on_device = self.device.type == "cpu" or _fits_on_device(dataset, self.device)
        self.on_device = keep_on_device
        self.images = dataset.images.to(self.device) if keep_on_device else dataset.images
        self.labels = dataset.labels.to(self.device) if keep_on_device else dataset.labels

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch) if self.train else None
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        batches = self._device_batches(order) if self.on_device else self._host_batches(order)
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.train and self.padding > 0:
                x = random_crop_flip(x, self.padding, _device_generator(generator, self.device))
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _device_batches(self, order: torch.Tensor):
        order = order.to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]

    def _host_batches(self, order: torch.Tensor):
        pin = torch.cuda.is_available()

        def gather(start: int):
            index = order[start : start + self.batch_size]
            x = torch.empty((len(index), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=pin)
            y = torch.empty(len(index), dtype=self.labels.dtype, pin_memory=pin)
            return torch.index_select(self.images, 0, index, out=x), torch.index_select(self.labels, 0, index, out=y)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="batches") as pool:
            pending: deque = deque()
            for start in range(0, len(order), self.batch_size):
                pending.append(pool.submit(gather, start))
                if len(pending) > self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def _device_generator(cpu_generator: torch.Generator, device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return cpu_generator
    seed = int(torch.randint(0, 2**62, (1,), generator=cpu_generator))
    return torch.Generator(device=device).manual_seed(seed)


def _fits_on_device(dataset: ImageDataset, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return dataset.images.numel() < 0.25 * free
