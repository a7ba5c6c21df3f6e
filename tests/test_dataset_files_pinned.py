"""Fingerprints and split sizes pinned to the values the code gave before the fingerprint and the split
count each got one home (core.engine.fingerprints, core.engine.splits) and a folder upload's test split
was drawn without torch: a change to either changes the id of every dataset already uploaded, or the
data a job trains on."""

from __future__ import annotations

import io
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core.engine.dataset_files import inspect_dataset_file, load_dataset_file
from core.engine.datasets import ImageDataset, fingerprint, split_validation
from core.engine.splits import TorchPermutations, held_out_count

CLASS_SIZES = {"ant": 1, "bee": 2, "cat": 5, "dog": 11}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A zip of class folders under one wrapper folder (a test split is made; grey and RGB mixed) and an
    .npz of uint8 NHWC train and float NCHW test images, from a fixed seed."""
    folder = tmp_path_factory.mktemp("pinned")
    rng = np.random.default_rng(123)

    def png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    with zipfile.ZipFile(folder / "tree.zip", "w") as zf:
        for name, n in CLASS_SIZES.items():
            for i in range(n):
                pixels = rng.integers(0, 256, (4, 4, 3) if i % 3 else (4, 4), dtype=np.uint8)
                zf.writestr(f"data/{name}/{i:02d}.png", png(pixels))
    np.savez(
        folder / "arrays.npz",
        x_train=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8),
        y_train=np.array([0, 1, 2, 0, 1, 2]),
        x_test=rng.random((3, 3, 4, 4), dtype=np.float32),
        y_test=np.array([2, 1, 0]),
    )
    return folder


@pytest.mark.parametrize(
    ("name", "plain", "resized", "test_labels"),
    [
        (
            "tree.zip",
            "334f218c9e4ce422a9113a4891b8ff2ec9337997d4cfbba53de73c3753c9be4c",
            "c40543355c4a0d5c3e1e9434a0353f118ec90fe5ac819991ef6306ee9778a5d1",
            [1, 2, 3, 3],
        ),
        (
            "arrays.npz",
            "b0a42a5a93b48b19a9e46f326cc84d4ea05260a128a7b2fad5857ef011530b68",
            "50d7b3c21235d8fc462ff70262f0c851c60aa8b0094fa32e35fe959260f1fc04",
            [2, 1, 0],
        ),
    ],
)
def test_an_uploads_fingerprint_and_test_split_are_unchanged(files, name, plain, resized, test_labels):
    assert inspect_dataset_file(files / name)["fingerprint"] == plain
    assert inspect_dataset_file(files / name, resize=(3, 5))["fingerprint"] == resized
    train, test = load_dataset_file(files / name)
    assert fingerprint(train, test) == plain  # the worker's fingerprint of the loaded file is the upload's
    assert test.labels.tolist() == test_labels


def pinned_dataset() -> ImageDataset:
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (40, 1, 2, 2), dtype=torch.uint8, generator=generator)
    labels = torch.tensor([0] + [1] * 2 + [2] * 3 + [3] * 9 + [4] * 25)
    return ImageDataset(images, labels[torch.randperm(40, generator=generator)], list("abcde"))


def test_a_datasets_fingerprint_is_unchanged():
    data = pinned_dataset()
    assert fingerprint(data) == "0b3820d0e87fdd8698c7a420652c476dc76adbb5dcdc56f4a9760449e6199f51"
    assert fingerprint(data, data.subset(torch.arange(5))) == "26b1fe8db7178e7aa500882246855d5198ff0625bdacb5c6664880c14baed393"
    # numpy arrays hash as the tensors they back
    parts = (data, data.subset(torch.arange(5)))
    arrays = [SimpleNamespace(images=d.images.numpy(), labels=d.labels.numpy(), classes=d.classes) for d in parts]
    assert fingerprint(*arrays) == fingerprint(*parts)


def test_validation_splits_are_unchanged():
    data = pinned_dataset()
    train, val = split_validation(data, 0.1, 0)
    assert val.labels.tolist() == [2, 4, 3, 1, 4]
    assert "".join(map(str, train.labels.tolist())) == "34443434443444430434443214444244443"
    _, val = split_validation(data, 0.3, 5)
    assert val.labels.tolist() == [3, 4, 4, 3, 2, 4, 4, 4, 3, 1, 4, 4, 4]


def test_held_out_counts_are_unchanged():
    sizes = [0, 1, 2, 3, 4, 5, 7, 10, 12, 13, 15, 25, 99]
    assert [held_out_count(n, 0.1) for n in sizes] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 10]
    assert [held_out_count(n, 0.2) for n in sizes] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 5, 20]
    assert [held_out_count(n, 0.25) for n in sizes] == [0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 6, 25]


def test_the_permutations_drawn_without_torch_are_torchs():
    """A folder upload's test split is drawn with numpy (the upload check imports no torch), as torch.randperm drew it."""
    for seed in (0, 1, 2**32 - 1):
        generator = torch.Generator().manual_seed(seed)
        permutations = TorchPermutations(seed)
        for n in (0, 1, 2, 3, 5, 17, 1000, 0, 4096, 2, 70_000):
            assert permutations.randperm(n).tolist() == torch.randperm(n, generator=generator).tolist(), (seed, n)
