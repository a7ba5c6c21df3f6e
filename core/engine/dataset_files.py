"""Load user-uploaded dataset files safely: an .npz of arrays, or an ImageFolder tree in a zip/tar.

Accepted formats (detected from the file's content, not only its extension):

* ``.npz`` with arrays ``x_train, y_train, x_test, y_test`` (images uint8 0-255 or float 0-1;
  N×H×W×C, N×C×H×W or N×H×W; integer labels 0..K-1).
* ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` of image folders: ``train/<class>/<image>`` and
  ``test/<class>/<image>``, or just ``<class>/<image>`` (a seeded, class-stratified 20% test split
  is then made). One common top-level folder (``mydata/...``) is stripped.

Uploads are hostile until proven otherwise. Nothing is extracted to disk. Bytes are counted as they
are really decompressed (declared sizes can lie), so size and compression-ratio limits stop zip
bombs; unsafe paths, links and special files are refused; every failure is a `DatasetError` that
names the file, the entry inside the archive where there is one, and what to fix.

Memory: a dataset costs one copy of its decoded pixels (uint8 N×C×H×W) plus small change.

* Archives are read twice. The first pass reads every member but only each image's header (size
  and mode): the decoded size is counted against ``FileLimits.max_decoded_bytes`` and, as a
  compression ratio, against the file's size, and labels and the train/test split are worked out
  from the paths, all before a single pixel is decoded. The second pass decodes each image straight
  into its row of the preallocated train or test array.
* .npz arrays are streamed out of their members a few MiB at a time and converted (dtype, layout,
  resize) chunk by chunk into the preallocated uint8 arrays; only Fortran-ordered arrays, which
  cannot be streamed image by image, are read whole first (one extra copy in their own dtype).
* The tensors returned wrap those arrays (`torch.from_numpy`), and `inspect_dataset_file` hashes
  them where they lie.

``resize=(height, width)`` resizes every image to that size while decoding, with Pillow's bilinear
filter (`Image.resize`, antialiased when shrinking; aspect ratio not kept), so datasets of mixed
image sizes can be used. The result depends only on the file and `resize` (and the Pillow version),
so a worker loading a file with the `resize` it was inspected with gets the same fingerprint.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import lzma
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
import torch
from PIL import Image

from .datasets import DatasetError, ImageDataset


@dataclass(frozen=True)
class FileLimits:
    max_uncompressed_bytes: int = 2 * 1024**3  # bytes extracted: image files in an archive, .npy data in an .npz
    # The uint8 N×C×H×W arrays the dataset decodes to (what a loaded dataset holds in memory), counted
    # from the image headers before decoding. 2 GiB takes TinyImageNet (1.2 GiB) or CIFAR (176 MiB).
    max_decoded_bytes: int = 2 * 1024**3
    max_compression_ratio: float = 200.0  # extracted or decoded bytes / compressed bytes, whole file and per entry
    max_entries: int = 500_000
    max_images: int = 1_000_000
    max_image_side: int = 512  # for the images in the file and for `resize`
    max_classes: int = 10_000


ACCEPTED_FORMATS = (
    ".npz (arrays x_train, y_train, x_test, y_test), or .zip / .tar / .tar.gz / .tgz of image folders "
    "(train/<class>/<image> and test/<class>/<image>, or <class>/<image>)"
)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Pillow plugins allowed to parse uploads: the common raster formats only (no EPS/Ghostscript etc.).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
GREY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
RESIZE_FILTER = Image.Resampling.BILINEAR
# Ratios are only judged past this many bytes: small files (a tar header, a blank PNG) legitimately
# compress "too well", and a bomb must be big to do harm.
RATIO_GRACE_BYTES = 1 << 20
CHUNK = 1 << 20
NPZ_CHUNK_BYTES = 2 << 20  # .npz images are converted this many float64 bytes at a time
TEST_FRACTION = 0.2
SPLIT_SEED = 0

_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_RESIZE_TEXT = re.compile(r"^\s*([0-9]+)\s*[xX×]\s*([0-9]+)\s*$")
# What a broken archive raises while being read (gzip.BadGzipFile and bz2 errors are OSErrors;
# zipfile raises NotImplementedError for a garbled "version needed to extract").
_CORRUPT = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    OSError,
    ValueError,
    NotImplementedError,
)


def load_dataset_file(
    path: Path, limits: FileLimits = FileLimits(), *, resize: tuple[int, int] | None = None
) -> tuple[ImageDataset, ImageDataset]:
    """Returns (train, test). `resize`: (height, width) every image is resized to, or None."""
    _fmt, train, test = _load(Path(path), limits, _resize_size(resize, limits, Path(path).name))
    return train, test


def inspect_dataset_file(path: Path, limits: FileLimits = FileLimits(), *, resize: tuple[int, int] | None = None) -> dict:
    """Validate a dataset file fully and summarise it (fingerprint: sha256 of the decoded content,
    the same as `datasets.fingerprint(train, test)` of what `load_dataset_file` returns)."""
    resize = _resize_size(resize, limits, Path(path).name)
    fmt, train, test = _load(Path(path), limits, resize)
    return {
        "format": fmt,
        "fingerprint": _fingerprint(train, test),
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


def _fingerprint(*datasets: ImageDataset) -> str:
    """datasets.fingerprint's digest, hashing the arrays where they lie (its tobytes() copies them)."""
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(repr((tuple(dataset.images.shape), dataset.classes)).encode())
        digest.update(dataset.images.contiguous().numpy().data)
        digest.update(dataset.labels.contiguous().numpy().data)
    return digest.hexdigest()


def _load(path: Path, limits: FileLimits, resize: tuple[int, int] | None) -> tuple[str, ImageDataset, ImageDataset]:
    fmt = _detect_format(path)
    if fmt == "npz":
        train, test = _load_npz(path, limits, resize)
    elif fmt == "zip":
        train, test = _load_zip(path, limits, resize)
    else:
        train, test = _load_tar(path, fmt == "tar.gz", limits, resize)
    return fmt, train, test


def _resize_size(resize, limits: FileLimits, source: str) -> tuple[int, int] | None:
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


def _detect_format(path: Path) -> str:
    source = path.name
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        raise DatasetError(f"{source}: the file cannot be read ({err.strerror or err})") from err
    if not head:
        raise DatasetError(f"{source}: the file is empty; accepted formats: {ACCEPTED_FORMATS}")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "npz" if _looks_like_npz(path) else "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar" or path.suffix.lower() == ".tar":  # pre-POSIX tars lack the magic
        return "tar"
    if head.startswith(b"\x93NUMPY"):
        raise DatasetError(
            f"{source}: this is a single .npy array; save x_train, y_train, x_test and y_test together with numpy.savez into one .npz file"
        )
    raise DatasetError(f"{source}: unrecognised file format; accepted formats: {ACCEPTED_FORMATS}")


def _looks_like_npz(path: Path) -> bool:
    if path.suffix.lower() == ".npz":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
    except _CORRUPT:
        return False  # the zip loader reports the damage
    return bool(names) and all(n.endswith(".npy") for n in names)


# --- limits and entry paths --------------------------------------------------------------


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _where(source: str, entry: str | None) -> str:
    return f"{source}: entry {entry!r}" if entry else source


def _wh(height: int, width: int) -> str:
    return f"{width}x{height}"


def _check_size(source: str, total: int, limits: FileLimits, entry: str | None = None) -> None:
    if total > limits.max_uncompressed_bytes:
        raise DatasetError(
            f"{_where(source, entry)}: uncompressed size exceeds the limit of "
            f"{_size(limits.max_uncompressed_bytes)}; upload a smaller dataset"
        )


def _check_ratio(source: str, uncompressed: int, compressed: int, limits: FileLimits, entry: str | None = None) -> None:
    if uncompressed > RATIO_GRACE_BYTES and uncompressed > limits.max_compression_ratio * max(compressed, 1):
        raise DatasetError(
            f"{_where(source, entry)}: compression ratio {uncompressed / max(compressed, 1):.0f}:1 exceeds the "
            f"limit of {limits.max_compression_ratio:g}:1 (this looks like a zip bomb); real image data "
            f"does not compress that well"
        )


def _check_decoded(
    source: str, num_images: int, chw: tuple[int, int, int], limits: FileLimits, file_bytes: int, entry: str | None = None
) -> None:
    """The uint8 pixels `num_images` images of C×H×W decode to, against the decoded-size and ratio limits."""
    decoded = num_images * chw[0] * chw[1] * chw[2]
    what = f"{num_images:,} images of {chw[0]}×{chw[1]}×{chw[2]} pixels" + (" so far" if entry else "")
    if decoded > limits.max_decoded_bytes:
        raise DatasetError(
            f"{_where(source, entry)}: the images decode to {_size(decoded)} ({what}), more than the limit of "
            f"{_size(limits.max_decoded_bytes)} for decoded images; upload fewer or smaller images "
            f"(or upload again with a smaller resize=WIDTHxHEIGHT)"
        )
    if decoded > RATIO_GRACE_BYTES and decoded > limits.max_compression_ratio * max(file_bytes, 1):
        raise DatasetError(
            f"{_where(source, entry)}: the images decode to {_size(decoded)} ({what}) from a file of "
            f"{_size(file_bytes)}, a ratio of {decoded / max(file_bytes, 1):.0f}:1 over the limit of "
            f"{limits.max_compression_ratio:g}:1 (this looks like a decompression bomb); real image data "
            f"does not compress that well"
        )


def _check_entry_size(source: str, entry: str, size: int, limits: FileLimits) -> None:
    """One image file can't be bigger than a generous 16 bytes a pixel plus 4 MiB of metadata."""
    if size > 16 * limits.max_image_side**2 + (4 << 20):
        side = limits.max_image_side
        raise DatasetError(f"{source}: entry {entry!r} is {_size(size)}, too large for an image of at most {side}×{side} pixels")


def _corrupt_entry(source: str, entry: str, err: Exception) -> DatasetError:
    return DatasetError(f"{source}: entry {entry!r} is truncated or corrupt ({err}); re-create the archive and upload again")


class _Budget:
    """Counts the bytes really decompressed so far against the size and whole-archive ratio limits."""

    def __init__(self, source: str, limits: FileLimits, compressed_bytes):
        self.source, self.limits, self.compressed_bytes = source, limits, compressed_bytes
        self.total = 0

    def add(self, n: int, entry: str | None = None) -> None:
        self.total += n
        _check_size(self.source, self.total, self.limits, entry)
        _check_ratio(self.source, self.total, self.compressed_bytes(), self.limits, entry)


def _safe_parts(name: str, source: str) -> tuple[str, ...]:
    """The entry's path components; refuses absolute paths, '..', drive letters and backslashes."""
    if "\\" in name or "\x00" in name or name.startswith("/") or _DRIVE_LETTER.match(name):
        raise DatasetError(
            f"{source}: entry {name!r} has an unsafe path (absolute, drive letter or backslash); "
            f"re-create the archive with plain relative paths"
        )
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DatasetError(
            f"{source}: entry {name!r} has an unsafe path that points outside the archive ('..'); "
            f"re-create the archive with plain relative paths"
        )
    return parts


def _ignored(parts: tuple[str, ...]) -> bool:
    """macOS resource forks, hidden files and folders, Windows thumbnail caches."""
    return any(p.startswith(".") or p in IGNORED_NAMES for p in parts)


# --- .npz --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NpyHeader:
    member: str
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype


def _load_npz(path: Path, limits: FileLimits, resize: tuple[int, int] | None) -> tuple[ImageDataset, ImageDataset]:
    source = path.name
    try:
        file_bytes = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            _check_zip_directory(zf.infolist(), source, limits, file_bytes)
            found = [n.removesuffix(".npy") for n in zf.namelist()]
            missing = [key for key in NPZ_KEYS if key not in found]
            if missing:
                raise DatasetError(
                    f"{source}: missing array(s) {', '.join(missing)}; an .npz dataset needs "
                    f"{', '.join(NPZ_KEYS)} (found: {', '.join(found) or 'nothing'})"
                )
            headers = {key: _npy_header(zf, key, source) for key in NPZ_KEYS}
            chw = _check_npz_headers(headers, source, limits, resize)
            _check_decoded(source, headers["x_train"].shape[0] + headers["x_test"].shape[0], chw, limits, file_bytes)
            x_train = _read_npz_images(zf, headers["x_train"], "x_train", chw, source, resize)
            x_test = _read_npz_images(zf, headers["x_test"], "x_test", chw, source, resize)
            y_train = _read_npz_labels(zf, headers["y_train"], "y_train", source, limits)
            y_test = _read_npz_labels(zf, headers["y_test"], "y_test", source, limits)
    except DatasetError:
        raise
    except _CORRUPT as err:
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
    return (
        ImageDataset(torch.from_numpy(x_train), torch.from_numpy(y_train), classes),
        ImageDataset(torch.from_numpy(x_test), torch.from_numpy(y_test), classes),
    )


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
            else (f"save them at one size, or upload again with resize={_wh(*train_chw[1:])} to have them resized")
        )
        raise DatasetError(
            f"{source}: train and test images differ in shape: x_train is {train_chw} and x_test is {test_chw} (C, H, W); {fix}"
        )
    if num_images > limits.max_images:
        raise DatasetError(f"{source}: {num_images:,} images is more than the limit of {limits.max_images:,}")
    total_bytes = sum(int(np.prod(h.shape, dtype=np.float64)) * h.dtype.itemsize for h in headers.values())
    _check_size(source, total_bytes, limits)
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
                _store(out[start + offset], image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), resize)
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


# --- archives ----------------------------------------------------------------------------

# An archive's entries that count, in archive order, after every safety check: (name, path parts,
# the file's bytes, or None for a folder). Read once per pass; each pass reads the archive afresh.
_EntryStream = Generator[tuple[str, tuple[str, ...], bytes | None], None, None]
_Entries = Callable[[], _EntryStream]


def _check_zip_directory(infos: list[zipfile.ZipInfo], source: str, limits: FileLimits, archive_bytes: int) -> None:
    """Everything the zip's central directory declares, checked before any member is read."""
    if len(infos) > limits.max_entries:
        raise DatasetError(f"{source}: the archive has {len(infos):,} entries, more than the limit of {limits.max_entries:,}")
    declared = 0
    for info in infos:
        entry = info.filename
        _safe_parts(entry, source)
        if info.flag_bits & 0x1:
            raise DatasetError(f"{source}: entry {entry!r} is encrypted; upload an archive without a password")
        mode = info.external_attr >> 16
        if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DatasetError(f"{source}: entry {entry!r} is a symbolic link or special file; only regular files and folders are allowed")
        _check_ratio(source, info.file_size, info.compress_size, limits, entry)
        declared += info.file_size
        _check_size(source, declared, limits, entry)
    _check_ratio(source, declared, archive_bytes, limits)


def _load_zip(path: Path, limits: FileLimits, resize) -> tuple[ImageDataset, ImageDataset]:
    source = path.name
    try:
        archive_bytes = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_zip_directory(infos, source, limits, archive_bytes)
            entries = lambda: _zip_entries(zf, infos, source, limits, archive_bytes)
            return _load_images(source, entries, limits, resize, archive_bytes)
    except DatasetError:
        raise
    except _CORRUPT as err:
        raise DatasetError(f"{source}: the zip archive is truncated or corrupt ({err}); re-create it and upload again") from err


def _zip_entries(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], source: str, limits: FileLimits, archive_bytes: int) -> _EntryStream:
    budget = _Budget(source, limits, lambda: archive_bytes)
    for info in infos:
        parts = _safe_parts(info.filename, source)
        if parts and not _ignored(parts):
            yield info.filename, parts, None if info.is_dir() else _read_zip_entry(zf, info, budget)


def _read_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> bytes:
    source, limits, entry = budget.source, budget.limits, info.filename
    _check_entry_size(source, entry, info.file_size, limits)
    data = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(CHUNK):
                data += chunk
                budget.add(len(chunk), entry)
                _check_ratio(source, len(data), info.compress_size, limits, entry)
                _check_entry_size(source, entry, len(data), limits)
    except NotImplementedError as err:
        raise DatasetError(
            f"{source}: entry {entry!r} uses a compression method that cannot be read ({err}); "
            f"re-create the zip with standard deflate compression"
        ) from err
    except DatasetError:
        raise
    except _CORRUPT as err:
        raise _corrupt_entry(source, entry, err) from err
    return bytes(data)


class _CountingReader:
    """A file as tarfile/gzip read it, counting the bytes that pass."""

    def __init__(self, stream, budget: _Budget | None = None):
        self.stream, self.budget, self.count = stream, budget, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > CHUNK:
            size = CHUNK  # callers loop on short reads; a bomb can't make us inflate more than a chunk
        data = self.stream.read(size)
        self.count += len(data)
        if self.budget is not None:
            self.budget.add(len(data))
        return data


def _load_tar(path: Path, gz: bool, limits: FileLimits, resize) -> tuple[ImageDataset, ImageDataset]:
    source = path.name
    try:
        return _load_images(source, lambda: _tar_entries(path, gz, limits), limits, resize, path.stat().st_size)
    except DatasetError:
        raise
    except _CORRUPT as err:
        kind = "tar.gz" if gz else "tar"
        raise DatasetError(f"{source}: the {kind} archive is truncated or corrupt ({err}); re-create it and upload again") from err


def _tar_entries(path: Path, gz: bool, limits: FileLimits) -> _EntryStream:
    source = path.name
    with open(path, "rb") as raw_file:
        raw = _CountingReader(raw_file)
        budget = _Budget(source, limits, lambda: raw.count)
        # casts: the stubs ask any fileobj for seek (and tarfile for write/tell/close), but a reading GzipFile and
        # a stream-mode ("r|") tarfile only ever call read, which is all _CountingReader has
        inflated = gzip.GzipFile(fileobj=cast(IO[bytes], raw), mode="rb") if gz else raw
        stream = _CountingReader(inflated, budget)  # every byte tarfile sees, headers included
        with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|") as tar:
            for number, member in enumerate(tar, 1):
                entry = member.name
                if number > limits.max_entries:
                    raise DatasetError(f"{source}: the archive has more than the limit of {limits.max_entries:,} entries")
                parts = _safe_parts(entry, source)
                if member.issym() or member.islnk():
                    kind = "a symbolic link" if member.issym() else "a hard link"
                    raise DatasetError(f"{source}: entry {entry!r} is {kind}; only regular files and folders are allowed")
                if not (member.isreg() or member.isdir()):
                    raise DatasetError(
                        f"{source}: entry {entry!r} is a device or other special file; only regular files and folders are allowed"
                    )
                if not parts or _ignored(parts):
                    continue
                if member.isdir():
                    yield entry, parts, None
                    continue
                _check_entry_size(source, entry, member.size, limits)
                _check_size(source, budget.total + member.size, limits, entry)
                try:
                    extracted = tar.extractfile(member)
                    assert extracted is not None  # extractfile gives None only for what is not a regular file, refused above
                    data = extracted.read()
                except DatasetError:
                    raise
                except _CORRUPT as err:
                    raise _corrupt_entry(source, entry, err) from err
                yield entry, parts, data
            end_of_members = tar.offset
        while stream.read(CHUNK):  # read to the end, so gzip verifies its checksum
            pass
    if stream.count - end_of_members < tarfile.BLOCKSIZE:
        raise EOFError("the end-of-archive marker is missing")


# --- images ------------------------------------------------------------------------------


def _open_image(data: bytes, where: str, max_side: int):
    """Pillow's lazy image: only the header is parsed until its pixels are asked for."""
    image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # Pillow's decompression-bomb guard runs here
    width, height = image.size
    if width > max_side or height > max_side:
        image.close()
        raise DatasetError(f"{where}: the image is {width}×{height} pixels; the limit is {max_side} a side")
    return image


@contextlib.contextmanager
def _image_errors(where: str):
    try:
        yield
    except DatasetError:
        raise
    except Image.UnidentifiedImageError as err:
        raise DatasetError(f"{where}: not an image file (accepted: {', '.join(IMAGE_FORMATS)}); remove it from the class folders") from err
    except Image.DecompressionBombError as err:
        raise DatasetError(f"{where}: the image is far too large ({err})") from err
    except Exception as err:  # Pillow decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise DatasetError(f"{where}: the image is truncated or corrupt ({type(err).__name__}: {err})") from err


def _image_header(data: bytes, where: str, max_side: int) -> tuple[int, int, int]:
    """(height, width, channels it decodes to: 1 for greyscale, 3 for everything else), without decoding."""
    with _image_errors(where), _open_image(data, where, max_side) as image:
        return image.size[1], image.size[0], 1 if image.mode in GREY_MODES else 3


def _decode_image(data: bytes, where: str, max_side: int) -> np.ndarray:
    """H×W uint8 for greyscale images, H×W×3 for everything else."""
    with _image_errors(where), _open_image(data, where, max_side) as image:
        if image.mode.startswith("I;16"):  # 16-bit grey: scale 0..65535 to 0..255 (convert('L') would clip)
            return ((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8)
        if image.mode in GREY_MODES:
            return np.asarray(image.convert("L"))
        return np.asarray(image.convert("RGB"))


def _store(target: np.ndarray, pixels: np.ndarray, resize: tuple[int, int] | None) -> None:
    """Write H×W or H×W×3 uint8 pixels, resized if asked, into a C×H×W row (grey repeated over 3 channels)."""
    if resize is not None and pixels.shape[:2] != tuple(resize):
        resized = Image.fromarray(np.ascontiguousarray(pixels)).resize((resize[1], resize[0]), RESIZE_FILTER)
        pixels = np.asarray(resized)
    target[...] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class _Scan:
    """The header pass over an archive: each image's path, their common decoded size and channel
    count, and the decoded total checked against the limits image by image."""

    def __init__(self, source: str, limits: FileLimits, resize, file_bytes: int):
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
        height, width, channels = _image_header(data, f"{self.source}: entry {name!r}", self.limits.max_image_side)
        if self.size is None:
            self.size = (height, width)
        elif self.resize is None and (height, width) != self.size:
            h0, w0 = self.size
            raise DatasetError(
                f"{self.source}: mixed image sizes: entry {name!r} is {width}×{height} pixels but "
                f"{self.names[0]!r} is {w0}×{h0}; resize all images to one size, or upload again with "
                f"resize={_wh(h0, w0)} to have every image resized to {w0}×{h0}"
            )
        self.channels = max(self.channels, channels)
        self.names.append(name)
        self.parts.append(parts)
        _check_decoded(self.source, n + 1, self.chw, self.limits, self.file_bytes, name)

    @property
    def chw(self) -> tuple[int, int, int]:
        assert self.size is not None, "no image yet"
        return (self.channels, *self.size)


def _load_images(source: str, entries: _Entries, limits: FileLimits, resize, file_bytes: int) -> tuple[ImageDataset, ImageDataset]:
    """Headers first (limits, labels, split), then every image decoded into its row of the train or test array."""
    scan = _Scan(source, limits, resize, file_bytes)
    with contextlib.closing(entries()) as first_pass:
        for name, parts, data in first_pass:
            if data is None:
                scan.folders.add(parts)
            else:
                scan.add(name, parts, data)
    classes, labels, train_index, test_index = _layout(source, scan.names, scan.parts, scan.folders, limits)

    train = np.empty((len(train_index), *scan.chw), np.uint8)
    test = np.empty((len(test_index), *scan.chw), np.uint8)
    rows = np.empty(len(scan.names), np.int64)  # archive order → row of train, or len(train) + row of test
    rows[train_index] = np.arange(len(train_index))
    rows[test_index] = len(train_index) + np.arange(len(test_index))

    def row(i: int) -> np.ndarray:
        r = int(rows[i])
        return train[r] if r < len(train) else test[r - len(train)]

    _decode_all(entries, scan, row)

    def dataset(array: np.ndarray, index: list[int]) -> ImageDataset:
        return ImageDataset(torch.from_numpy(array), torch.from_numpy(labels[np.asarray(index, dtype=np.int64)]), classes)

    return dataset(train, train_index), dataset(test, test_index)


def _decode_all(entries: _Entries, scan: _Scan, row: Callable[[int], np.ndarray]) -> None:
    """The second pass: the i-th image of the archive decoded into row(i)."""
    source, decoded = scan.source, 0
    with contextlib.closing(entries()) as second_pass:
        for name, _parts, data in second_pass:
            if data is None:
                continue
            if decoded == len(scan.names) or name != scan.names[decoded]:
                raise DatasetError(f"{source}: the file changed while it was being read; upload it again")
            where = f"{source}: entry {name!r}"
            pixels = _decode_image(data, where, scan.limits.max_image_side)
            colour_into_grey = pixels.ndim == 3 and scan.channels == 1
            if colour_into_grey or (scan.resize is None and pixels.shape[:2] != scan.size):
                raise DatasetError(f"{where}: the image's pixels do not match its header; re-save the image")
            _store(row(decoded), pixels, scan.resize)
            decoded += 1
    if decoded != len(scan.names):
        raise DatasetError(f"{source}: the file changed while it was being read; upload it again")


# --- the class layout --------------------------------------------------------------------


def _layout(
    source: str, names: list[str], image_parts: list[tuple[str, ...]], folders: set, limits: FileLimits
) -> tuple[list[str], np.ndarray, list[int], list[int]]:
    """Class names, each image's label, and the train and test images (indices in archive order,
    sorted by label then path) from the folder layout alone."""
    layout_help = "train/<class>/<image> and test/<class>/<image>, or <class>/<image>"
    if not names:
        raise DatasetError(
            f"{source}: no images found (the archive is empty, or holds only folders or hidden files); expected {layout_help}"
        )
    prefix = _wrapper_prefix(image_parts)
    paths = [p[len(prefix) :] for p in image_parts]
    folders = {f[len(prefix) :] for f in folders if f[: len(prefix)] == prefix and len(f) > len(prefix)}
    split_layout = any(p[0].lower() in ("train", "test") for p in paths)

    # (subset, class) per image, and the class folders the archive declares
    if split_layout:
        for i, p in enumerate(paths):
            if len(p) != 3 or p[0].lower() not in ("train", "test"):
                raise DatasetError(f"{source}: entry {names[i]!r} is not at train/<class>/<image> or test/<class>/<image>")
        keys = [(p[0].lower(), p[1]) for p in paths]
        declared = {(f[0].lower(), f[1]) for f in folders if len(f) >= 2 and f[0].lower() in ("train", "test")}
        for subset in ("train", "test"):
            if not any(s == subset for s, _ in keys):
                raise DatasetError(
                    f"{source}: the {subset}/ folder is missing or has no images; provide both train/<class>/ "
                    f"and test/<class>/ folders, or only <class>/ folders to have a test split made"
                )
    else:
        for i, p in enumerate(paths):
            if len(p) != 2:
                raise DatasetError(
                    f"{source}: entry {names[i]!r} is not at <class>/<image> (or train/<class>/<image>, test/<class>/<image>)"
                )
        keys = [("all", p[0]) for p in paths]
        declared = {("all", f[0]) for f in folders}
    empty = sorted(declared - set(keys))
    if empty:
        subset, name = empty[0]
        folder = name if subset == "all" else f"{subset}/{name}"
        raise DatasetError(f"{source}: class folder {folder!r} has no images; remove it or add images")

    classes = sorted({name for subset, name in keys if subset != "test"})
    if len(classes) < 2:
        raise DatasetError(f"{source}: only a single class ({classes[0]!r}) was found; a classifier needs at least 2 class folders")
    if len(classes) > limits.max_classes:
        raise DatasetError(f"{source}: {len(classes):,} classes is more than the limit of {limits.max_classes:,}")
    index = {name: k for k, name in enumerate(classes)}
    for _, name in keys:
        if name not in index:
            raise DatasetError(
                f"{source}: test/{name} has no matching train/{name} folder; the test split may only use classes present in train/"
            )
    labels = np.array([index[name] for _, name in keys], dtype=np.int64)
    order = sorted(range(len(paths)), key=lambda i: (labels[i], paths[i]))  # independent of archive order

    if split_layout:
        train_index = [i for i in order if keys[i][0] == "train"]
        test_index = [i for i in order if keys[i][0] == "test"]
    else:
        train_index, test_index = _stratified_split(order, labels, len(classes))
        if not test_index:
            raise DatasetError(f"{source}: too few images to make a test split; each class needs at least 2 images")
    return classes, labels, train_index, test_index


def _wrapper_prefix(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Common top-level folder(s) wrapping the layout, e.g. ('mydata',) for mydata/<class>/<image>."""
    prefix: tuple[str, ...] = ()
    while True:
        k = len(prefix)
        if not all(len(p) >= k + 3 for p in paths):
            return prefix
        tops = {p[k] for p in paths}
        if len(tops) != 1 or next(iter(tops)).lower() in ("train", "test"):
            return prefix
        prefix += (paths[0][k],)


def _stratified_split(order: list[int], labels: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    """A seeded, class-stratified TEST_FRACTION test split (at least 1 per class with ≥2 images)."""
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i in order:
        by_class[labels[i]].append(i)
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    test: set[int] = set()
    for members in by_class:
        n_test = min(len(members) - 1, max(1, round(TEST_FRACTION * len(members)))) if len(members) > 1 else 0
        permutation = torch.randperm(len(members), generator=generator)[:n_test]
        test.update(members[j] for j in permutation.tolist())
    return [i for i in order if i not in test], [i for i in order if i in test]
