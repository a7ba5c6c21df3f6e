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
at a time. The tensors returned wrap those arrays (`torch.from_numpy`), and `inspect_dataset_file`
hashes them where they lie.

``resize=(height, width)`` resizes every image to that size while decoding, with Pillow's bilinear
filter (`Image.resize`, antialiased when shrinking; aspect ratio not kept), so datasets of mixed
image sizes can be used. The result depends only on the file and `resize` (and the Pillow version),
so a worker loading a file with the `resize` it was inspected with gets the same fingerprint.

The modules, one job each:

* `inspection`: a file read by its format's reader; `inspect_dataset_file`, `parse_resize`.
* `formats`: which kind of file it is, from its content.
* `limits`: `FileLimits` and the size, ratio and decoded-pixel checks.
* `npz`: .npz arrays, streamed and converted chunk by chunk.
* `archives`: zip and tar entries, read safely.
* `folders`: a class-folder tree's images, in two passes (headers, then pixels).
* `images`: image files decoded (and resized) with Pillow.
* `layout`: class names, labels and the train/test split, from the paths.
"""

from .formats import ACCEPTED_FORMATS
from .inspection import inspect_dataset_file, load_dataset_file, parse_resize
from .limits import FileLimits
from .npz import NPZ_KEYS

__all__ = ["ACCEPTED_FORMATS", "NPZ_KEYS", "FileLimits", "inspect_dataset_file", "load_dataset_file", "parse_resize"]
