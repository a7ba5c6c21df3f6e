"""An .npz of arrays x_train, y_train, x_test, y_test read safely: shapes, dtypes and sizes checked
from the .npy headers before any data is decompressed (pickled object arrays refused), then the images
streamed out of their members a few MiB at a time and converted (dtype, layout, resize) chunk by chunk
into preallocated uint8 N×C×H×W arrays. Only Fortran-ordered arrays, which cannot be streamed image by
image, are read whole first (one extra copy in their own dtype)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import DatasetError
from .archives import check_zip_directory
from .arrays import ArrayDataset
from .images import store
from .limits import CORRUPT, FileLimits, check_decoded, check_size, wh

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_CHUNK_BYTES = 2 << 20  # .npz images are converted this many float64 bytes at a time


@dataclass(frozen=True)
class _NpyHeader:
    member: str
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype


def load_npz(path: Path, limits: FileLimits, resize: tuple[int, int] | None) -> tuple[ArrayDataset, ArrayDataset]:
    source = path.name
    try:
        file_bytes = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            check_zip_directory(zf.infolist(), source, limits, file_bytes)
            found = [n.removesuffix(".npy") for n in zf.namelist()]
            missing = [key for key in NPZ_KEYS if key not in found]
            if missing:
                raise DatasetError(
                    f"{source}: missing array(s) {', '.join(missing)}; an .npz dataset needs "
                    f"{', '.join(NPZ_KEYS)} (found: {', '.join(found) or 'nothing'})"
                )
            headers = {key: _npy_header(zf, key, source) for key in NPZ_KEYS}
            chw = _check_npz_headers(headers, source, limits, resize)
            check_decoded(source, headers["x_train"].shape[0] + headers["x_test"].shape[0], chw, limits, file_bytes)
            x_train = _read_npz_images(zf, headers["x_train"], "x_train", chw, source, resize)
            x_test = _read_npz_images(zf, headers["x_test"], "x_test", chw, source, resize)
            y_train = _read_npz_labels(zf, headers["y_train"], "y_train", source, limits)
            y_test = _read_npz_labels(zf, headers["y_test"], "y_test", source, limits)
    except DatasetError:
        raise
    except CORRUPT as err:
        raise DatasetError(f"{source}: the .npz file is truncated or corrupt ({err}); save it again with numpy.savez") from err

    num_classes = int(y_train.max()) + 1
    if int(y_test.max()) >= num_classes:
        raise DatasetError(
            f"{source}: y_test contains label {int(y_test.max())} but y_train's labels only go up to "
            f"{num_classes - 1}; every test label must be a class seen in training"
        )
    present = np.unique(y_train)
    if len(present) < 2:
        raise DatasetError(f"{source}: y_train holds a single class (label {int(present[0])}); at least 2 classes are needed")
    classes = [str(k) for k in range(num_classes)]
    return ArrayDataset(x_train, y_train, classes), ArrayDataset(x_test, y_test, classes)


def _open_npy(zf: zipfile.ZipFile, member: str, key: str, source: str) -> tuple[IO[bytes], _NpyHeader]:
    """The member opened and positioned at its array data, and its header."""
    f = zf.open(member)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DatasetError(
                f"{source}: array {key} uses .npy format version {version}, which is not supported; save it with numpy.savez"
            )
    except BaseException:
        f.close()
        raise
    return f, _NpyHeader(member, tuple(shape), bool(fortran_order), dtype)


def _npy_header(zf: zipfile.ZipFile, key: str, source: str) -> _NpyHeader:
    """Shape and dtype from the .npy header, read before any array data is decompressed."""
    member = f"{key}.npy" if f"{key}.npy" in zf.namelist() else key
    f, header = _open_npy(zf, member, key, source)
    f.close()
    if header.dtype.hasobject:
        raise DatasetError(
            f"{source}: array {key} is a pickled object array, which is refused for safety; "
            f"save plain numeric arrays (uint8 or float images, integer labels)"
        )
    return header


def _npz_chw(key: str, shape: tuple[int, ...], source: str) -> tuple[int, int, int]:
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if len(shape) == 4 and shape[3] in (1, 3):
        return (shape[3], shape[1], shape[2])
    if len(shape) == 4 and shape[1] in (1, 3):
        return (shape[1], shape[2], shape[3])
    raise DatasetError(f"{source}: {key} has shape {shape}; expected N×H×W×C or N×C×H×W with 1 or 3 channels, or N×H×W greyscale")


def _check_npz_headers(headers: dict[str, _NpyHeader], source: str, limits: FileLimits, resize) -> tuple[int, int, int]:
    """Check dtypes, shapes and sizes from the headers; return the C×H×W the images load as."""
    shapes, num_images = {}, 0
    for key in ("x_train", "x_test"):
        shape, dtype = headers[key].shape, headers[key].dtype
        if dtype.kind not in "uif":
            raise DatasetError(f"{source}: {key} has dtype {dtype}; images must be uint8 (0-255) or float (0-1)")
        chw = _npz_chw(key, shape, source)
        if shape[0] == 0 or chw[1] == 0 or chw[2] == 0:
            raise DatasetError(f"{source}: {key} is empty (shape {shape})")
        if max(chw[1:]) > limits.max_image_side:
            raise DatasetError(f"{source}: {key} images are {chw[2]}×{chw[1]} pixels; the limit is {limits.max_image_side} a side")
        shapes[key] = chw
        num_images += shape[0]
    for key in ("y_train", "y_test"):
        shape, dtype = headers[key].shape, headers[key].dtype
        if dtype.kind not in "ui":
            raise DatasetError(f"{source}: {key} has dtype {dtype}; labels must be integers 0..K-1")
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):  # (N,) or Keras-style (N, 1)
            raise DatasetError(f"{source}: {key} has shape {shape}; labels must be a 1-D array of class indices")
        x_key, n = "x" + key[1:], headers["x" + key[1:]].shape[0]
        if shape[0] != n:
            raise DatasetError(f"{source}: {x_key} has {n} images but {key} has {shape[0]} labels; they must match one to one")
    train_chw, test_chw = shapes["x_train"], shapes["x_test"]
    if train_chw[0] != test_chw[0] or (resize is None and train_chw != test_chw):
        fix = (
            "save them with one channel count"
            if train_chw[0] != test_chw[0]
            else (f"save them at one size, or upload again with resize={wh(*train_chw[1:])} to have them resized")
        )
        raise DatasetError(
            f"{source}: train and test images differ in shape: x_train is {train_chw} and x_test is {test_chw} (C, H, W); {fix}"
        )
    if num_images > limits.max_images:
        raise DatasetError(f"{source}: {num_images:,} images is more than the limit of {limits.max_images:,}")
    total_bytes = sum(int(np.prod(h.shape, dtype=np.float64)) * h.dtype.itemsize for h in headers.values())
    check_size(source, total_bytes, limits)
    return (train_chw[0], *(resize or train_chw[1:]))


def _read_npz_images(zf: zipfile.ZipFile, header: _NpyHeader, key: str, chw: tuple[int, int, int], source: str, resize) -> np.ndarray:
    """uint8 N×C×H×W, converted from integer 0-255 or float 0-1 a few MiB at a time as they are decompressed."""
    out = np.empty((header.shape[0], *chw), np.uint8)
    for start, chunk in _npy_chunks(zf, header, key, source):
        pixels = _as_nchw(_to_uint8(chunk, key, start, source), len(header.shape), header.shape)
        if resize is None:
            out[start : start + len(pixels)] = pixels
        else:
            for offset, image in enumerate(pixels):
                store(out[start + offset], image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), resize)
    return out


def _npy_chunks(zf: zipfile.ZipFile, header: _NpyHeader, key: str, source: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first image index, images) blocks of an image array, read a block at a time."""
    n, per_image = header.shape[0], int(np.prod(header.shape[1:]))
    step = max(1, NPZ_CHUNK_BYTES // (per_image * 8))
    if header.fortran_order:  # image i is scattered over the whole member: read it in full (one copy)
        with zf.open(header.member) as f:
            whole = np.lib.format.read_array(f, allow_pickle=False)
        for start in range(0, n, step):
            yield start, whole[start : start + step]
        return
    buffer = np.empty((min(step, n), *header.shape[1:]), header.dtype)
    f, _header = _open_npy(zf, header.member, key, source)
    with f:
        for start in range(0, n, step):
            block = buffer[: min(step, n - start)]
            _read_exactly(f, block.reshape(-1).view(np.uint8).data, key)
            yield start, block
        if f.read(1):
            raise ValueError(f"array {key} has more data than its header declares")


def _read_exactly(f, target: memoryview, key: str) -> None:
    filled = 0
    while filled < len(target):
        n = f.readinto(target[filled:])
        if not n:
            raise EOFError(f"array {key} ends before the data its header declares")
        filled += n


def _to_uint8(x: np.ndarray, key: str, start: int, source: str) -> np.ndarray:
    """One block of images as uint8: floats 0-1 rounded from x*255 in float64, integers 0-255 as they are."""
    if x.dtype.kind == "f":
        part = x.astype(np.float64)
        finite = np.isfinite(part).reshape(len(part), -1).all(axis=1)
        if not finite.all():
            first = start + int(np.argmin(finite))
            raise DatasetError(f"{source}: {key} contains NaN or infinite values (first in image {first})")
        low, high = float(part.min()), float(part.max())
        if low < 0 or high > 1:
            raise DatasetError(
                f"{source}: {key} is float with values from {low:g} to {high:g}; float images must lie in "
                f"[0, 1] (divide by 255, or save uint8 images)"
            )
        part *= 255
        return np.rint(part, out=part).astype(np.uint8)
    if x.dtype != np.uint8:
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise DatasetError(f"{source}: {key} has dtype {x.dtype} with values from {low} to {high}; integer images must lie in 0..255")
        return x.astype(np.uint8)
    return x


def _as_nchw(x: np.ndarray, ndim: int, shape: tuple[int, ...]) -> np.ndarray:
    """A view of N×H×W, N×H×W×C or N×C×H×W images as N×C×H×W (same rule as _npz_chw)."""
    if ndim == 3:
        return x[:, None]
    if shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    return x


def _read_npz_labels(zf: zipfile.ZipFile, header: _NpyHeader, key: str, source: str, limits: FileLimits) -> np.ndarray:
    with zf.open(header.member) as f:
        y = np.lib.format.read_array(f, allow_pickle=False).reshape(-1)  # (N,) or (N, 1), checked from the header
    if int(y.min()) < 0:
        raise DatasetError(f"{source}: {key} contains negative label {int(y.min())}; labels must be 0..K-1")
    if int(y.max()) >= limits.max_classes:
        raise DatasetError(f"{source}: {key} contains label {int(y.max())}; at most {limits.max_classes:,} classes are allowed")
    return y.astype(np.int64)
