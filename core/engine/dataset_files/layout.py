"""The class layout of an image tree, from its paths alone: the class names, each image's label, and
which images are train and which test (`train/` and `test/` folders, or a seeded, class-stratified
TEST_FRACTION test split of `<class>/` folders). One common top-level folder is stripped."""

from __future__ import annotations

import numpy as np

from ..errors import DatasetError
from ..splits import TorchPermutations, held_out_count
from .limits import FileLimits

TEST_FRACTION = 0.2
SPLIT_SEED = 0
LAYOUT_HELP = "train/<class>/<image> and test/<class>/<image>, or <class>/<image>"


def layout(
    source: str, names: list[str], image_parts: list[tuple[str, ...]], folders: set[tuple[str, ...]], limits: FileLimits
) -> tuple[list[str], np.ndarray, list[int], list[int]]:
    """Class names, each image's label, and the train and test images (indices in archive order,
    sorted by label then path) from the folder layout alone."""
    if not names:
        raise DatasetError(
            f"{source}: no images found (the archive is empty, or holds only folders or hidden files); expected {LAYOUT_HELP}"
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
    permutations = TorchPermutations(SPLIT_SEED)  # the split torch.randperm made before, drawn without torch
    test: set[int] = set()
    for members in by_class:
        permutation = permutations.randperm(len(members))[: held_out_count(len(members), TEST_FRACTION)]
        test.update(members[j] for j in permutation.tolist())
    return [i for i in order if i not in test], [i for i in order if i in test]
