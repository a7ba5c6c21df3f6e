"""User-uploaded dataset files, loaded safely: an .npz of arrays, or an ImageFolder tree in a zip/tar.

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

Memory: a dataset costs one copy of its decoded pixels (uint8 N×C×H×W) plus small change. Archives
are read twice (headers, then pixels straight into their rows); .npz arrays are converted a few MiB
at a time. `inspect_dataset_file` hashes those arrays where they lie, and the tensors
`load_dataset_file` returns wrap them (`torch.from_numpy`).

``resize=(height, width)`` resizes every image to that size while decoding, with Pillow's bilinear
filter (`Image.resize`, antialiased when shrinking; aspect ratio not kept), so datasets of mixed
image sizes can be used. The result depends only on the file and `resize` (and the Pillow version),
so a worker loading a file with the `resize` it was inspected with gets the same fingerprint.

Validating an upload imports no torch: only `tensors` does, and it is imported when
`load_dataset_file` is first asked for. The modules, one job each:

* `inspection`: a file read by its format's reader into arrays; `inspect_dataset_file`, `parse_resize`.
* `tensors`: `load_dataset_file`, those arrays as the engine's torch datasets.
* `formats`: which kind of file it is, from its content.
* `limits`: `FileLimits` and the size, ratio and decoded-pixel checks.
* `npz`: .npz arrays, streamed and converted chunk by chunk.
* `archives`: zip and tar entries, read safely.
* `folders`: a class-folder tree's images, in two passes (headers, then pixels).
* `images`: image files decoded (and resized) with Pillow.
* `layout`: class names, labels and the train/test split, from the paths.
* `arrays`: `ArrayDataset`, the numpy arrays the readers produce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .arrays import ArrayDataset
from .formats import ACCEPTED_FORMATS
from .inspection import inspect_dataset_file, parse_resize, read_dataset_file
from .limits import FileLimits
from .npz import NPZ_KEYS

if TYPE_CHECKING:
    from .tensors import load_dataset_file

__all__ = [
    "ACCEPTED_FORMATS",
    "NPZ_KEYS",
    "ArrayDataset",
    "FileLimits",
    "inspect_dataset_file",
    "load_dataset_file",
    "parse_resize",
    "read_dataset_file",
]


def __getattr__(name: str) -> Any:
    """`load_dataset_file` imported on first use (PEP 562), so importing the package imports no torch."""
    if name == "load_dataset_file":
        from .tensors import load_dataset_file

        globals()[name] = load_dataset_file
        return load_dataset_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
