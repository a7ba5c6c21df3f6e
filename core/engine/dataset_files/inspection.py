"""A dataset file read whole, by its format's reader, into train and test arrays; the summary an upload
is validated with (`inspect_dataset_file`); and the resize option, as text or (height, width). Imports
no torch: the API validates uploads with this module alone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..fingerprints import fingerprint
from .archives import load_tar, load_zip
from .arrays import ArrayDataset
from .formats import detect_format
from .limits import DEFAULT_LIMITS, FileLimits
from .npz import load_npz

_RESIZE_TEXT = re.compile(r"^\s*([0-9]+)\s*[xX×]\s*([0-9]+)\s*$")


def read_dataset_file(
    path: Path, limits: FileLimits = DEFAULT_LIMITS, *, resize: tuple[int, int] | None = None
) -> tuple[str, ArrayDataset, ArrayDataset]:
    """(format, train, test), every check passed. `resize`: (height, width) every image is resized to, or None."""
    path = Path(path)
    resize = _resize_size(resize, limits, path.name)
    fmt = detect_format(path)
    if fmt == "npz":
        train, test = load_npz(path, limits, resize)
    elif fmt == "zip":
        train, test = load_zip(path, limits, resize)
    else:
        train, test = load_tar(path, fmt == "tar.gz", limits, resize)
    return fmt, train, test


def inspect_dataset_file(path: Path, limits: FileLimits = DEFAULT_LIMITS, *, resize: tuple[int, int] | None = None) -> dict:
    """Validate a dataset file fully and summarise it (fingerprint: `fingerprint(train, test)` of what
    `load_dataset_file` returns, hashed where the arrays lie)."""
    resize = _resize_size(resize, limits, Path(path).name)
    fmt, train, test = read_dataset_file(path, limits, resize=resize)
    return {
        "format": fmt,
        "fingerprint": fingerprint(train, test),
        "num_train": len(train),
        "num_test": len(test),
        "num_classes": train.num_classes,
        "classes": list(train.classes),
        "input_shape": train.input_shape,
        "resize": resize,
    }


def parse_resize(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (e.g. '32x32', as the error messages suggest it) → (height, width)."""
    match = _RESIZE_TEXT.match(text)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise DatasetError(f"resize {text!r}: give the size as WIDTHxHEIGHT in pixels, e.g. 32x32")
    return int(match[2]), int(match[1])


def _resize_size(resize: Any, limits: FileLimits, source: str) -> tuple[int, int] | None:
    """`resize` checked and as (height, width) ints."""
    if resize is None:
        return None
    side = limits.max_image_side
    if (
        not isinstance(resize, (tuple, list))
        or len(resize) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= side for v in resize)
    ):
        raise DatasetError(f"{source}: resize={resize!r} is not a size; give (height, width) in pixels, each from 1 to {side}")
    return int(resize[0]), int(resize[1])
