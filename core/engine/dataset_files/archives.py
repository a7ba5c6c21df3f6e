"""Zip and tar (plain or gzipped) archives of image folders, read safely and never extracted: every
entry's path and type checked (no absolute paths, '..', links or special files), its bytes counted as
they are really decompressed against the size and ratio limits (declared sizes can lie), and the
entries that count handed to `folders.load_images`."""

from __future__ import annotations

import gzip
import re
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import IO, Any, cast

from ..errors import DatasetError
from .arrays import ArrayDataset
from .folders import EntryStream, load_images
from .limits import CHUNK, CORRUPT, Budget, FileLimits, check_entry_size, check_ratio, check_size, corrupt_entry

IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


def safe_parts(name: str, source: str) -> tuple[str, ...]:
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


# --- zip ---------------------------------------------------------------------------------


def check_zip_directory(infos: list[zipfile.ZipInfo], source: str, limits: FileLimits, archive_bytes: int) -> None:
    """Everything the zip's central directory declares, checked before any member is read."""
    if len(infos) > limits.max_entries:
        raise DatasetError(f"{source}: the archive has {len(infos):,} entries, more than the limit of {limits.max_entries:,}")
    declared = 0
    for info in infos:
        entry = info.filename
        safe_parts(entry, source)
        if info.flag_bits & 0x1:
            raise DatasetError(f"{source}: entry {entry!r} is encrypted; upload an archive without a password")
        mode = info.external_attr >> 16
        if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DatasetError(f"{source}: entry {entry!r} is a symbolic link or special file; only regular files and folders are allowed")
        check_ratio(source, info.file_size, info.compress_size, limits, entry)
        declared += info.file_size
        check_size(source, declared, limits, entry)
    check_ratio(source, declared, archive_bytes, limits)


def load_zip(path: Path, limits: FileLimits, resize: tuple[int, int] | None) -> tuple[ArrayDataset, ArrayDataset]:
    source = path.name
    try:
        archive_bytes = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            check_zip_directory(infos, source, limits, archive_bytes)
            entries = lambda: _zip_entries(zf, infos, source, limits, archive_bytes)
            return load_images(source, entries, limits, resize, archive_bytes)
    except DatasetError:
        raise
    except CORRUPT as err:
        raise DatasetError(f"{source}: the zip archive is truncated or corrupt ({err}); re-create it and upload again") from err


def _zip_entries(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], source: str, limits: FileLimits, archive_bytes: int) -> EntryStream:
    budget = Budget(source, limits, lambda: archive_bytes)
    for info in infos:
        parts = safe_parts(info.filename, source)
        if parts and not _ignored(parts):
            yield info.filename, parts, None if info.is_dir() else _read_zip_entry(zf, info, budget)


def _read_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget) -> bytes:
    source, limits, entry = budget.source, budget.limits, info.filename
    check_entry_size(source, entry, info.file_size, limits)
    data = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(CHUNK):
                data += chunk
                budget.add(len(chunk), entry)
                check_ratio(source, len(data), info.compress_size, limits, entry)
                check_entry_size(source, entry, len(data), limits)
    except NotImplementedError as err:
        raise DatasetError(
            f"{source}: entry {entry!r} uses a compression method that cannot be read ({err}); "
            f"re-create the zip with standard deflate compression"
        ) from err
    except DatasetError:
        raise
    except CORRUPT as err:
        raise corrupt_entry(source, entry, err) from err
    return bytes(data)


# --- tar ---------------------------------------------------------------------------------


class _CountingReader:
    """A file as tarfile/gzip read it, counting the bytes that pass."""

    def __init__(self, stream: Any, budget: Budget | None = None):
        self.stream, self.budget, self.count = stream, budget, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > CHUNK:
            size = CHUNK  # callers loop on short reads; a bomb can't make us inflate more than a chunk
        data = self.stream.read(size)
        self.count += len(data)
        if self.budget is not None:
            self.budget.add(len(data))
        return data


def load_tar(path: Path, gz: bool, limits: FileLimits, resize: tuple[int, int] | None) -> tuple[ArrayDataset, ArrayDataset]:
    source = path.name
    try:
        return load_images(source, lambda: _tar_entries(path, gz, limits), limits, resize, path.stat().st_size)
    except DatasetError:
        raise
    except CORRUPT as err:
        kind = "tar.gz" if gz else "tar"
        raise DatasetError(f"{source}: the {kind} archive is truncated or corrupt ({err}); re-create it and upload again") from err


def _tar_entries(path: Path, gz: bool, limits: FileLimits) -> EntryStream:
    source = path.name
    with open(path, "rb") as raw_file:
        raw = _CountingReader(raw_file)
        budget = Budget(source, limits, lambda: raw.count)
        # casts: the stubs ask any fileobj for seek (and tarfile for write/tell/close), but a reading GzipFile and
        # a stream-mode ("r|") tarfile only ever call read, which is all _CountingReader has
        inflated = gzip.GzipFile(fileobj=cast(IO[bytes], raw), mode="rb") if gz else raw
        stream = _CountingReader(inflated, budget)  # every byte tarfile sees, headers included
        with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|") as tar:
            for number, member in enumerate(tar, 1):
                entry = member.name
                if number > limits.max_entries:
                    raise DatasetError(f"{source}: the archive has more than the limit of {limits.max_entries:,} entries")
                parts = safe_parts(entry, source)
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
                check_entry_size(source, entry, member.size, limits)
                check_size(source, budget.total + member.size, limits, entry)
                try:
                    extracted = tar.extractfile(member)
                    assert extracted is not None  # extractfile gives None only for what is not a regular file, refused above
                    data = extracted.read()
                except DatasetError:
                    raise
                except CORRUPT as err:
                    raise corrupt_entry(source, entry, err) from err
                yield entry, parts, data
            end_of_members = tar.offset
        while stream.read(CHUNK):  # read to the end, so gzip verifies its checksum
            pass
    if stream.count - end_of_members < tarfile.BLOCKSIZE:
        raise EOFError("the end-of-archive marker is missing")
