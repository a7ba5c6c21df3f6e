"""A tree of class folders' images read into uint8 N×C×H×W train and test arrays in two passes over
the entries: first each image's header only (the decoded size counted against the limits, the labels
and split worked out from the paths), then every image decoded straight into its row."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator

import numpy as np

from ..errors import DatasetError
from .arrays import ArrayDataset
from .images import decode_image, image_header, store
from .layout import layout
from .limits import FileLimits, check_decoded, wh

# An archive's entries that count, in archive order, after every safety check: (name, path parts,
# the file's bytes, or None for a folder). Read once per pass; each pass reads the archive afresh.
EntryStream = Generator[tuple[str, tuple[str, ...], bytes | None], None, None]
Entries = Callable[[], EntryStream]


class _Scan:
    """The header pass over an archive: each image's path, their common decoded size and channel
    count, and the decoded total checked against the limits image by image."""

    def __init__(self, source: str, limits: FileLimits, resize: tuple[int, int] | None, file_bytes: int):
        self.source, self.limits, self.resize, self.file_bytes = source, limits, resize, file_bytes
        self.names: list[str] = []
        self.parts: list[tuple[str, ...]] = []
        self.folders: set[tuple[str, ...]] = set()
        self.size: tuple[int, int] | None = resize  # (H, W) every image decodes to
        self.channels = 1  # 3 once any image is in colour: grey images are then repeated over 3 channels

    def add(self, name: str, parts: tuple[str, ...], data: bytes) -> None:
        n = len(self.names)
        if n >= self.limits.max_images:
            raise DatasetError(f"{self.source}: more than the limit of {self.limits.max_images:,} images")
        height, width, channels = image_header(data, f"{self.source}: entry {name!r}", self.limits.max_image_side)
        if self.size is None:
            self.size = (height, width)
        elif self.resize is None and (height, width) != self.size:
            h0, w0 = self.size
            raise DatasetError(
                f"{self.source}: mixed image sizes: entry {name!r} is {width}×{height} pixels but "
                f"{self.names[0]!r} is {w0}×{h0}; resize all images to one size, or upload again with "
                f"resize={wh(h0, w0)} to have every image resized to {w0}×{h0}"
            )
        self.channels = max(self.channels, channels)
        self.names.append(name)
        self.parts.append(parts)
        check_decoded(self.source, n + 1, self.chw, self.limits, self.file_bytes, name)

    @property
    def chw(self) -> tuple[int, int, int]:
        assert self.size is not None, "no image yet"
        return (self.channels, *self.size)


def load_images(
    source: str, entries: Entries, limits: FileLimits, resize: tuple[int, int] | None, file_bytes: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Headers first (limits, labels, split), then every image decoded into its row of the train or test array."""
    scan = _Scan(source, limits, resize, file_bytes)
    with contextlib.closing(entries()) as first_pass:
        for name, parts, data in first_pass:
            if data is None:
                scan.folders.add(parts)
            else:
                scan.add(name, parts, data)
    classes, labels, train_index, test_index = layout(source, scan.names, scan.parts, scan.folders, limits)

    train = np.empty((len(train_index), *scan.chw), np.uint8)
    test = np.empty((len(test_index), *scan.chw), np.uint8)
    rows = np.empty(len(scan.names), np.int64)  # archive order → row of train, or len(train) + row of test
    rows[train_index] = np.arange(len(train_index))
    rows[test_index] = len(train_index) + np.arange(len(test_index))

    def row(i: int) -> np.ndarray:
        r = int(rows[i])
        return train[r] if r < len(train) else test[r - len(train)]

    _decode_all(entries, scan, row)

    def dataset(array: np.ndarray, index: list[int]) -> ArrayDataset:
        return ArrayDataset(array, labels[np.asarray(index, dtype=np.int64)], classes)

    return dataset(train, train_index), dataset(test, test_index)


def _decode_all(entries: Entries, scan: _Scan, row: Callable[[int], np.ndarray]) -> None:
    """The second pass: the i-th image of the archive decoded into row(i)."""
    source, decoded = scan.source, 0
    with contextlib.closing(entries()) as second_pass:
        for name, _parts, data in second_pass:
            if data is None:
                continue
            if decoded == len(scan.names) or name != scan.names[decoded]:
                raise DatasetError(f"{source}: the file changed while it was being read; upload it again")
            where = f"{source}: entry {name!r}"
            pixels = decode_image(data, where, scan.limits.max_image_side)
            colour_into_grey = pixels.ndim == 3 and scan.channels == 1
            if colour_into_grey or (scan.resize is None and pixels.shape[:2] != scan.size):
                raise DatasetError(f"{where}: the image's pixels do not match its header; re-save the image")
            store(row(decoded), pixels, scan.resize)
            decoded += 1
    if decoded != len(scan.names):
        raise DatasetError(f"{source}: the file changed while it was being read; upload it again")
