"""The limits an upload is held to (`FileLimits`) and the checks that enforce them: bytes extracted,
pixels decoded, compression ratios, one entry's size, and a running budget of the bytes really
decompressed. Every check raises a `DatasetError` naming the file, the entry where there is one, and
what to fix."""

from __future__ import annotations

import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DatasetError


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


DEFAULT_LIMITS = FileLimits()

# Ratios are only judged past this many bytes: small files (a tar header, a blank PNG) legitimately
# compress "too well", and a bomb must be big to do harm.
RATIO_GRACE_BYTES = 1 << 20
CHUNK = 1 << 20  # the most bytes decompressed in one read

# What a broken archive raises while being read (gzip.BadGzipFile and bz2 errors are OSErrors;
# zipfile raises NotImplementedError for a garbled "version needed to extract").
CORRUPT = (
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


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def where(source: str, entry: str | None) -> str:
    return f"{source}: entry {entry!r}" if entry else source


def wh(height: int, width: int) -> str:
    """A size as the resize option is written: WIDTHxHEIGHT."""
    return f"{width}x{height}"


def check_size(source: str, total: int, limits: FileLimits, entry: str | None = None) -> None:
    if total > limits.max_uncompressed_bytes:
        raise DatasetError(
            f"{where(source, entry)}: uncompressed size exceeds the limit of "
            f"{size_text(limits.max_uncompressed_bytes)}; upload a smaller dataset"
        )


def check_ratio(source: str, uncompressed: int, compressed: int, limits: FileLimits, entry: str | None = None) -> None:
    if uncompressed > RATIO_GRACE_BYTES and uncompressed > limits.max_compression_ratio * max(compressed, 1):
        raise DatasetError(
            f"{where(source, entry)}: compression ratio {uncompressed / max(compressed, 1):.0f}:1 exceeds the "
            f"limit of {limits.max_compression_ratio:g}:1 (this looks like a zip bomb); real image data "
            f"does not compress that well"
        )


def check_decoded(
    source: str, num_images: int, chw: tuple[int, int, int], limits: FileLimits, file_bytes: int, entry: str | None = None
) -> None:
    """The uint8 pixels `num_images` images of C×H×W decode to, against the decoded-size and ratio limits."""
    decoded = num_images * chw[0] * chw[1] * chw[2]
    what = f"{num_images:,} images of {chw[0]}×{chw[1]}×{chw[2]} pixels" + (" so far" if entry else "")
    if decoded > limits.max_decoded_bytes:
        raise DatasetError(
            f"{where(source, entry)}: the images decode to {size_text(decoded)} ({what}), more than the limit of "
            f"{size_text(limits.max_decoded_bytes)} for decoded images; upload fewer or smaller images "
            f"(or upload again with a smaller resize=WIDTHxHEIGHT)"
        )
    if decoded > RATIO_GRACE_BYTES and decoded > limits.max_compression_ratio * max(file_bytes, 1):
        raise DatasetError(
            f"{where(source, entry)}: the images decode to {size_text(decoded)} ({what}) from a file of "
            f"{size_text(file_bytes)}, a ratio of {decoded / max(file_bytes, 1):.0f}:1 over the limit of "
            f"{limits.max_compression_ratio:g}:1 (this looks like a decompression bomb); real image data "
            f"does not compress that well"
        )


def check_entry_size(source: str, entry: str, size: int, limits: FileLimits) -> None:
    """One image file can't be bigger than a generous 16 bytes a pixel plus 4 MiB of metadata."""
    if size > 16 * limits.max_image_side**2 + (4 << 20):
        side = limits.max_image_side
        raise DatasetError(f"{source}: entry {entry!r} is {size_text(size)}, too large for an image of at most {side}×{side} pixels")


def corrupt_entry(source: str, entry: str, err: Exception) -> DatasetError:
    return DatasetError(f"{source}: entry {entry!r} is truncated or corrupt ({err}); re-create the archive and upload again")


class Budget:
    """Counts the bytes really decompressed so far against the size and whole-archive ratio limits."""

    def __init__(self, source: str, limits: FileLimits, compressed_bytes: Callable[[], int]):
        self.source, self.limits, self.compressed_bytes = source, limits, compressed_bytes
        self.total = 0

    def add(self, n: int, entry: str | None = None) -> None:
        self.total += n
        check_size(self.source, self.total, self.limits, entry)
        check_ratio(self.source, self.total, self.compressed_bytes(), self.limits, entry)
