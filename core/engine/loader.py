"""Training and evaluation batches: shuffled and augmented on the device, from data kept on the
device as uint8 or streamed from host memory through pinned buffers."""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .datasets import ImageDataset


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
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        batches = self._device_batches(order) if self.on_device else self._host_batches(order)
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if generator is not None and self.padding > 0:  # training (the only case with a generator): augment
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
