"""Load user-uploaded dataset files safely: an .npz of arrays, or an ImageFolder tree in a zip/tar.

Accepted formats (detected from the file's content, not only its extension):

* ``.npz`` with arrays ``x_train, y_train, x_test, y_test`` (images uint8 0-255 or float 0-1;
  N×H×W×C, N×C×H×W or N×H×W; integer labels 0..K-1).
* ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` of image folders: ``train/<class>/<image>`` and
  ``test/<class>/<image>``, or just ``<class>/<image>`` (a seeded, class-stratified 20% test split
  is then made). One common top-level folder (``mydata/...``) is stripped.

Uploads are hostile until proven otherwise. Nothing is extracted to disk: archive members are read
into memory one at a time and decoded straight into a growing uint8 array. Bytes are counted as
they are really decompressed (declared sizes can lie), so size and compression-ratio limits stop
zip bombs; unsafe paths, links and special files are refused; every failure is a `DatasetError`
that names the file, the entry inside the archive where there is one, and what to fix.
"""

from __future__ import annotations

import gzip
import io
import lzma
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .datasets import DatasetError, ImageDataset, fingerprint


@dataclass(frozen=True)
class FileLimits:
    max_uncompressed_bytes: int = 2 * 1024**3  # total bytes extracted/decoded
    max_compression_ratio: float = 200.0  # uncompressed/compressed, whole archive and per entry
    max_entries: int = 500_000
    max_images: int = 1_000_000
    max_image_side: int = 512
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
# Ratios are only judged past this many bytes: small files (a tar header, a blank PNG) legitimately
# compress "too well", and a bomb must be big to do harm.
RATIO_GRACE_BYTES = 1 << 20
CHUNK = 1 << 20
TEST_FRACTION = 0.2
SPLIT_SEED = 0

_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
# What a broken archive raises while being read (gzip.BadGzipFile and bz2 errors are OSErrors;
# zipfile raises NotImplementedError for a garbled "version needed to extract").
_CORRUPT = (
    zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, struct.error, OSError, ValueError,
    NotImplementedError,
)


def load_dataset_file(path: Path, limits: FileLimits = FileLimits()) -> tuple[ImageDataset, ImageDataset]:
    """Returns (train, test)."""
    _fmt, train, test = _load(Path(path), limits)
    return train, test


def inspect_dataset_file(path: Path, limits: FileLimits = FileLimits()) -> dict:
    """Validate a dataset file fully and summarise it (fingerprint: sha256 of the decoded content)."""
    fmt, train, test = _load(Path(path), limits)
    return {
        "format": fmt,
        "fingerprint": fingerprint(train, test),
        "num_train": len(train),
        "num_test": len(test),
        "num_classes": train.num_classes,
        "classes": list(train.classes),
        "input_shape": train.input_shape,
    }


def _load(path: Path, limits: FileLimits) -> tuple[str, ImageDataset, ImageDataset]:
    fmt = _detect_format(path)
    if fmt == "npz":
        train, test = _load_npz(path, limits)
    elif fmt == "zip":
        train, test = _load_zip(path, limits)
    else:
        train, test = _load_tar(path, fmt == "tar.gz", limits)
    return fmt, train, test


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
            f"{source}: this is a single .npy array; save x_train, y_train, x_test and y_test together "
            f"with numpy.savez into one .npz file"
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


def _load_npz(path: Path, limits: FileLimits) -> tuple[ImageDataset, ImageDataset]:
    source = path.name
    try:
        with np.load(path, allow_pickle=False) as npz:
            _check_zip_directory(npz.zip.infolist(), source, limits, path.stat().st_size)
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise DatasetError(
                    f"{source}: missing array(s) {', '.join(missing)}; an .npz dataset needs "
                    f"{', '.join(NPZ_KEYS)} (found: {', '.join(npz.files) or 'nothing'})"
                )
            headers = {key: _npy_header(npz.zip, key, source) for key in NPZ_KEYS}
            layouts = _check_npz_headers(headers, source, limits)
            arrays = {key: npz[key] for key in NPZ_KEYS}
    except DatasetError:
        raise
    except _CORRUPT as err:
        raise DatasetError(f"{source}: the .npz file is truncated or corrupt ({err}); save it again with numpy.savez") from err

    x_train = _npz_images(arrays["x_train"], "x_train", layouts["x_train"], source)
    x_test = _npz_images(arrays["x_test"], "x_test", layouts["x_test"], source)
    y_train = _npz_labels(arrays["y_train"], "y_train", len(x_train), source, limits)
    y_test = _npz_labels(arrays["y_test"], "y_test", len(x_test), source, limits)
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


def _npy_header(zf: zipfile.ZipFile, key: str, source: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the .npy header, read before any array data is decompressed."""
    member = f"{key}.npy" if f"{key}.npy" in zf.namelist() else key
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DatasetError(
                f"{source}: array {key} uses .npy format version {version}, which is not supported; "
                f"save it with numpy.savez"
            )
    if dtype.hasobject:
        raise DatasetError(
            f"{source}: array {key} is a pickled object array, which is refused for safety; "
            f"save plain numeric arrays (uint8 or float images, integer labels)"
        )
    return shape, dtype


def _check_npz_headers(headers: dict, source: str, limits: FileLimits) -> dict[str, str]:
    """Check dtypes, shapes and sizes from the headers; return each x array's layout."""
    layouts, num_images, total_bytes, shapes = {}, 0, 0, {}
    for key in ("x_train", "x_test"):
        shape, dtype = headers[key]
        if dtype.kind not in "uif":
            raise DatasetError(f"{source}: {key} has dtype {dtype}; images must be uint8 (0-255) or float (0-1)")
        if len(shape) == 3:
            layouts[key], chw = "NHW", (1, shape[1], shape[2])
        elif len(shape) == 4 and shape[3] in (1, 3):
            layouts[key], chw = "NHWC", (shape[3], shape[1], shape[2])
        elif len(shape) == 4 and shape[1] in (1, 3):
            layouts[key], chw = "NCHW", tuple(shape[1:])
        else:
            raise DatasetError(
                f"{source}: {key} has shape {shape}; expected N×H×W×C or N×C×H×W with 1 or 3 channels, or N×H×W greyscale"
            )
        if shape[0] == 0 or chw[1] == 0 or chw[2] == 0:
            raise DatasetError(f"{source}: {key} is empty (shape {shape})")
        if max(chw[1:]) > limits.max_image_side:
            raise DatasetError(
                f"{source}: {key} images are {chw[2]}×{chw[1]} pixels; the limit is {limits.max_image_side} a side"
            )
        shapes[key] = chw
        num_images += shape[0]
    for key in ("y_train", "y_test"):
        shape, dtype = headers[key]
        if dtype.kind not in "ui":
            raise DatasetError(f"{source}: {key} has dtype {dtype}; labels must be integers 0..K-1")
    if shapes["x_train"] != shapes["x_test"]:
        raise DatasetError(
            f"{source}: train and test images differ in shape: x_train is {shapes['x_train']} and x_test is "
            f"{shapes['x_test']} (C, H, W)"
        )
    if num_images > limits.max_images:
        raise DatasetError(f"{source}: {num_images:,} images is more than the limit of {limits.max_images:,}")
    for key in NPZ_KEYS:
        shape, dtype = headers[key]
        total_bytes += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    _check_size(source, total_bytes, limits)
    return layouts


def _npz_images(x: np.ndarray, key: str, layout: str, source: str) -> np.ndarray:
    """uint8 N×C×H×W from integer 0-255 or float 0-1 arrays, converted a slice at a time."""
    if x.dtype.kind == "f":
        out = np.empty(x.shape, np.uint8)
        step = max(1, (16 << 20) // max(1, x[0].size * 8))
        for start in range(0, len(x), step):
            part = x[start : start + step].astype(np.float64)
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
            out[start : start + step] = np.rint(part * 255)
        x = out
    elif x.dtype != np.uint8:
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise DatasetError(
                f"{source}: {key} has dtype {x.dtype} with values from {low} to {high}; integer images must lie in 0..255"
            )
        x = x.astype(np.uint8)
    if layout == "NHW":
        x = x[:, None]
    elif layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _npz_labels(y: np.ndarray, key: str, n: int, source: str, limits: FileLimits) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style (N, 1) labels
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{source}: {key} has shape {y.shape}; labels must be a 1-D array of class indices")
    x_key = "x" + key[1:]
    if len(y) != n:
        raise DatasetError(f"{source}: {x_key} has {n} images but {key} has {len(y)} labels; they must match one to one")
    if int(y.min()) < 0:
        raise DatasetError(f"{source}: {key} contains negative label {int(y.min())}; labels must be 0..K-1")
    if int(y.max()) >= limits.max_classes:
        raise DatasetError(f"{source}: {key} contains label {int(y.max())}; at most {limits.max_classes:,} classes are allowed")
    return y.astype(np.int64)


# --- archives ----------------------------------------------------------------------------


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
            raise DatasetError(
                f"{source}: entry {entry!r} is a symbolic link or special file; only regular files and folders are allowed"
            )
        _check_ratio(source, info.file_size, info.compress_size, limits, entry)
        declared += info.file_size
        _check_size(source, declared, limits, entry)
    _check_ratio(source, declared, archive_bytes, limits)


def _load_zip(path: Path, limits: FileLimits) -> tuple[ImageDataset, ImageDataset]:
    source = path.name
    images, folders = _ImageSet(source, limits), set()
    try:
        archive_bytes = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_zip_directory(infos, source, limits, archive_bytes)
            budget = _Budget(source, limits, lambda: archive_bytes)
            for info in infos:
                parts = _safe_parts(info.filename, source)
                if not parts or _ignored(parts):
                    continue
                if info.is_dir():
                    folders.add(parts)
                    continue
                images.add(_read_zip_entry(zf, info, budget), info.filename, parts)
    except DatasetError:
        raise
    except _CORRUPT as err:
        raise DatasetError(f"{source}: the zip archive is truncated or corrupt ({err}); re-create it and upload again") from err
    return _assemble(source, images, folders, limits)


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


def _load_tar(path: Path, gz: bool, limits: FileLimits) -> tuple[ImageDataset, ImageDataset]:
    source = path.name
    images, folders = _ImageSet(source, limits), set()
    try:
        with open(path, "rb") as raw_file:
            raw = _CountingReader(raw_file)
            budget = _Budget(source, limits, lambda: raw.count)
            inflated = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            stream = _CountingReader(inflated, budget)  # every byte tarfile sees, headers included
            with tarfile.open(fileobj=stream, mode="r|") as tar:
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
                            f"{source}: entry {entry!r} is a device or other special file; "
                            f"only regular files and folders are allowed"
                        )
                    if not parts or _ignored(parts):
                        continue
                    if member.isdir():
                        folders.add(parts)
                        continue
                    _check_entry_size(source, entry, member.size, limits)
                    _check_size(source, budget.total + member.size, limits, entry)
                    try:
                        data = tar.extractfile(member).read()
                    except DatasetError:
                        raise
                    except _CORRUPT as err:
                        raise _corrupt_entry(source, entry, err) from err
                    images.add(data, entry, parts)
                end_of_members = tar.offset
            while stream.read(CHUNK):  # read to the end, so gzip verifies its checksum
                pass
        if stream.count - end_of_members < tarfile.BLOCKSIZE:
            raise EOFError("the end-of-archive marker is missing")
    except DatasetError:
        raise
    except _CORRUPT as err:
        kind = "tar.gz" if gz else "tar"
        raise DatasetError(
            f"{source}: the {kind} archive is truncated or corrupt ({err}); re-create it and upload again"
        ) from err
    return _assemble(source, images, folders, limits)


# --- images and the class layout ---------------------------------------------------------


def _decode_image(data: bytes, where: str, max_side: int) -> np.ndarray:
    """H×W uint8 for greyscale images, H×W×3 for everything else; sizes are checked before decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width > max_side or height > max_side:
                raise DatasetError(f"{where}: the image is {width}×{height} pixels; the limit is {max_side} a side")
            if image.mode.startswith("I;16"):  # 16-bit grey: scale 0..65535 to 0..255 (convert('L') would clip)
                return ((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8)
            if image.mode in GREY_MODES:
                return np.asarray(image.convert("L"))
            return np.asarray(image.convert("RGB"))
    except DatasetError:
        raise
    except Image.UnidentifiedImageError as err:
        raise DatasetError(
            f"{where}: not an image file (accepted: {', '.join(IMAGE_FORMATS)}); remove it from the class folders"
        ) from err
    except Image.DecompressionBombError as err:
        raise DatasetError(f"{where}: the image is far too large ({err})") from err
    except Exception as err:  # Pillow decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise DatasetError(f"{where}: the image is truncated or corrupt ({type(err).__name__}: {err})") from err


class _ImageSet:
    """Images decoded one at a time into a growing uint8 N×C×H×W array.

    Greyscale until the first colour image arrives; from then on everything is RGB (grey values
    repeated over the channels, exactly what Pillow's L→RGB conversion gives).
    """

    def __init__(self, source: str, limits: FileLimits):
        self.source, self.limits = source, limits
        self.array = np.empty((0, 1, 0, 0), np.uint8)
        self.names: list[str] = []
        self.parts: list[tuple[str, ...]] = []

    def __len__(self) -> int:
        return len(self.names)

    def add(self, data: bytes, name: str, parts: tuple[str, ...]) -> None:
        n = len(self.names)
        if n >= self.limits.max_images:
            raise DatasetError(f"{self.source}: more than the limit of {self.limits.max_images:,} images")
        pixels = _decode_image(data, f"{self.source}: entry {name!r}", self.limits.max_image_side)
        height, width = pixels.shape[:2]
        channels = 3 if pixels.ndim == 3 else 1
        if n == 0:
            self.array = np.empty((64, channels, height, width), np.uint8)
        elif (height, width) != self.array.shape[2:]:
            h0, w0 = self.array.shape[2:]
            raise DatasetError(
                f"{self.source}: mixed image sizes: entry {name!r} is {width}×{height} pixels but "
                f"{self.names[0]!r} is {w0}×{h0}; resize all images to one size"
            )
        if channels > self.array.shape[1]:
            self.array = np.repeat(self.array[:n], 3, axis=1)
        _check_size(self.source, (n + 1) * self.array[0].size, self.limits, name)
        if n == len(self.array):
            grown = np.empty((max(64, 2 * n), *self.array.shape[1:]), np.uint8)
            grown[:n] = self.array[:n]
            self.array = grown
        self.array[n] = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels
        self.names.append(name)
        self.parts.append(parts)


def _assemble(source: str, images: _ImageSet, folders: set, limits: FileLimits) -> tuple[ImageDataset, ImageDataset]:
    """Labels and the train/test split from the folder layout."""
    layout_help = "train/<class>/<image> and test/<class>/<image>, or <class>/<image>"
    if len(images) == 0:
        raise DatasetError(
            f"{source}: no images found (the archive is empty, or holds only folders or hidden files); "
            f"expected {layout_help}"
        )
    prefix = _wrapper_prefix(images.parts)
    paths = [p[len(prefix) :] for p in images.parts]
    folders = {f[len(prefix) :] for f in folders if f[: len(prefix)] == prefix and len(f) > len(prefix)}
    split_layout = any(p[0].lower() in ("train", "test") for p in paths)

    # (subset, class) per image, and the class folders the archive declares
    if split_layout:
        for i, p in enumerate(paths):
            if len(p) != 3 or p[0].lower() not in ("train", "test"):
                raise DatasetError(f"{source}: entry {images.names[i]!r} is not at train/<class>/<image> or test/<class>/<image>")
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
                    f"{source}: entry {images.names[i]!r} is not at <class>/<image> "
                    f"(or train/<class>/<image>, test/<class>/<image>)"
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
        raise DatasetError(
            f"{source}: only a single class ({classes[0]!r}) was found; a classifier needs at least 2 class folders"
        )
    if len(classes) > limits.max_classes:
        raise DatasetError(f"{source}: {len(classes):,} classes is more than the limit of {limits.max_classes:,}")
    index = {name: k for k, name in enumerate(classes)}
    for _, name in keys:
        if name not in index:
            raise DatasetError(
                f"{source}: test/{name} has no matching train/{name} folder; "
                f"the test split may only use classes present in train/"
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

    def dataset(selection: list[int]) -> ImageDataset:
        selection = np.asarray(selection, dtype=np.int64)
        return ImageDataset(torch.from_numpy(images.array[selection]), torch.from_numpy(labels[selection]), classes)

    return dataset(train_index), dataset(test_index)


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
    test = set()
    for members in by_class:
        n_test = min(len(members) - 1, max(1, round(TEST_FRACTION * len(members)))) if len(members) > 1 else 0
        permutation = torch.randperm(len(members), generator=generator)[:n_test]
        test.update(members[j] for j in permutation.tolist())
    return [i for i in order if i not in test], [i for i in order if i in test]
