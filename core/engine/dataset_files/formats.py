"""Which kind of dataset file this is, told from its content (not only its extension): an .npz, a
zip, a tar or a tar.gz; anything else is refused with the accepted formats named."""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import DatasetError
from .limits import CORRUPT

ACCEPTED_FORMATS = (
    ".npz (arrays x_train, y_train, x_test, y_test), or .zip / .tar / .tar.gz / .tgz of image folders "
    "(train/<class>/<image> and test/<class>/<image>, or <class>/<image>)"
)


def detect_format(path: Path) -> str:
    """The format's name: npz, zip, tar or tar.gz."""
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
    except CORRUPT:
        return False  # the zip loader reports the damage
    return bool(names) and all(n.endswith(".npy") for n in names)
