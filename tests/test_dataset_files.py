"""core.engine.dataset_files: happy paths and a corpus of hostile or broken uploads (all fixtures generated here)."""

from __future__ import annotations

import io
import re
import stat
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from core.engine.dataset_files import (
    FileLimits,
    inspect_dataset_file,
    load_dataset_file,
    parse_resize,
)
from core.engine.datasets import fingerprint
from core.engine.errors import DatasetError

RNG = np.random.default_rng(0)


# --- fixture builders --------------------------------------------------------------------


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def rgb(size: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)


def grey(size: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (size, size), dtype=np.uint8)


def write_zip(path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def write_tar(path, entries: dict[str, bytes], mode: str = "w:gz"):
    with tarfile.open(path, mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_with(path, member: tarfile.TarInfo, mode: str = "w"):
    """A valid small tree plus one special member."""
    with tarfile.open(path, mode) as tar:
        for name, data in class_tree(("a", "b"), 2).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(member, io.BytesIO(b"x" * member.size) if member.size else None)
    return path


def class_tree(classes=("cat", "dog", "eel"), per_class: int = 3, prefix: str = "", make=rgb) -> dict[str, bytes]:
    return {f"{prefix}{c}/{i:02d}.png": png(make()) for c in classes for i in range(per_class)}


def decoded(entries: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(io.BytesIO(data))) for name, data in entries.items()}


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def npz_arrays(n_train=12, n_test=6, shape=(8, 8, 3), classes=3):
    return {
        "x_train": RNG.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": RNG.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


def raises(match: str):
    return pytest.raises(DatasetError, match=match)


# --- .npz --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, to_nchw",
    [
        ((8, 8, 3), lambda x: x.transpose(0, 3, 1, 2)),  # NHWC
        ((8, 8, 1), lambda x: x.transpose(0, 3, 1, 2)),  # NHWC grey
        ((3, 8, 8), lambda x: x),  # NCHW
        ((1, 8, 8), lambda x: x),  # NCHW grey
        ((8, 8), lambda x: x[:, None]),  # NHW
    ],
)
def test_npz_layouts(tmp_path, shape, to_nchw):
    arrays = npz_arrays(shape=shape)
    train, test = load_dataset_file(save_npz(tmp_path / "d.npz", **arrays))
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert np.array_equal(train.images.numpy(), to_nchw(arrays["x_train"]))
    assert np.array_equal(test.images.numpy(), to_nchw(arrays["x_test"]))
    assert train.labels.tolist() == arrays["y_train"].tolist()
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == arrays["y_test"].tolist()
    assert train.classes == test.classes == ["0", "1", "2"]
    assert train.input_shape == test.input_shape == to_nchw(arrays["x_test"]).shape[1:]


def test_npz_float_images_round_to_uint8(tmp_path):
    arrays = npz_arrays()
    expected = arrays["x_train"].transpose(0, 3, 1, 2)
    arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    arrays["x_test"] = arrays["x_test"].astype(np.float64) / 255
    train, _ = load_dataset_file(save_npz(tmp_path / "d.npz", **arrays))
    assert np.array_equal(train.images.numpy(), expected)


def test_npz_int_images_in_range_and_column_labels(tmp_path):
    arrays = npz_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.int64)
    arrays["y_train"] = arrays["y_train"].astype(np.uint8)[:, None]  # Keras-style (N, 1)
    train, _ = load_dataset_file(save_npz(tmp_path / "d.npz", **arrays))
    assert train.images.dtype == torch.uint8 and train.labels.tolist() == list(np.arange(12) % 3)


def test_npz_detected_by_content_and_inspected(tmp_path):
    path = tmp_path / "upload.bin"
    save_npz(tmp_path / "d.npz", **npz_arrays())
    path.write_bytes((tmp_path / "d.npz").read_bytes())
    summary = inspect_dataset_file(path)
    assert re.fullmatch("[0-9a-f]{64}", summary.pop("fingerprint"))
    assert summary == {
        "format": "npz",
        "num_train": 12,
        "num_test": 6,
        "num_classes": 3,
        "classes": ["0", "1", "2"],
        "input_shape": (3, 8, 8),
        "resize": None,
    }


def _npz_case(**changes):
    arrays = npz_arrays()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize(
    "arrays, match",
    [
        (_npz_case(y_test=np.array([0, 1, 2, 3, 0, 1])), r"y_test contains label 3 .* up to 2"),
        (_npz_case(y_train=np.arange(12) % 3 - 1), r"negative label -1"),
        (_npz_case(x_train=np.full((12, 8, 8, 3), np.nan, np.float32)), r"x_train contains NaN or infinite"),
        (_npz_case(x_test=np.full((6, 8, 8, 3), np.inf)), r"x_test contains NaN or infinite"),
        (_npz_case(x_train=np.full((12, 8, 8, 3), 255.0)), r"float images must lie in \[0, 1\]"),
        (_npz_case(x_train=np.zeros((12, 8, 8, 3), np.complex64)), r"x_train has dtype complex64"),
        (_npz_case(x_train=np.full((12, 8, 8, 3), "a")), r"x_train has dtype <U1"),
        (_npz_case(x_train=np.full((12, 8, 8, 3), 300, np.int64)), r"integer images must lie in 0\.\.255"),
        (_npz_case(x_train=np.zeros((12, 8, 8, 3), bool)), r"x_train has dtype bool"),
        (_npz_case(y_train=np.arange(12) % 3 + 0.0), r"y_train has dtype float64; labels must be integers"),
        (_npz_case(x_test=None, y_test=None), r"missing array\(s\) x_test, y_test"),
        (_npz_case(y_train=np.arange(11) % 3), r"x_train has 12 images but y_train has 11 labels"),
        (_npz_case(x_test=np.zeros((6, 4, 4, 3), np.uint8)), r"train and test images differ in shape"),
        (_npz_case(x_train=np.zeros((0, 8, 8, 3), np.uint8), y_train=np.zeros(0, np.int64)), r"x_train is empty"),
        (_npz_case(y_train=np.zeros(12, np.int64), y_test=np.zeros(6, np.int64)), r"single class"),
        (_npz_case(x_train=np.zeros((12, 8, 8, 5), np.uint8)), r"x_train has shape \(12, 8, 8, 5\)"),
        (_npz_case(x_train=np.zeros((12, 8), np.uint8)), r"x_train has shape"),
        (_npz_case(y_train=np.zeros((12, 2), np.int64)), r"y_train has shape"),
    ],
)
def test_npz_invalid(tmp_path, arrays, match):
    with raises(r"d\.npz: .*" + match):
        load_dataset_file(save_npz(tmp_path / "d.npz", **arrays))


def test_npz_pickled_object_array_is_refused(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = np.array([{"evil": 1}] * 12, dtype=object)  # np.savez pickles this
    with raises(r"y_train is a pickled object array"):
        load_dataset_file(save_npz(tmp_path / "d.npz", **arrays))


def test_npz_limits(tmp_path):
    path = save_npz(tmp_path / "d.npz", **npz_arrays())
    with raises(r"18 images is more than the limit of 10"):
        load_dataset_file(path, FileLimits(max_images=10))
    with raises(r"8×8 pixels; the limit is 4"):
        load_dataset_file(path, FileLimits(max_image_side=4))
    with raises(r"uncompressed size exceeds"):
        load_dataset_file(path, FileLimits(max_uncompressed_bytes=1000))


def test_npz_truncated(tmp_path):
    path = save_npz(tmp_path / "d.npz", **npz_arrays())
    path.write_bytes(path.read_bytes()[:1500])
    with raises(r"d\.npz: the \.npz file is truncated or corrupt"):
        load_dataset_file(path)


def test_npz_bomb(tmp_path):
    path = tmp_path / "d.npz"
    arrays = npz_arrays()
    arrays["x_train"] = np.zeros((6000, 64, 64, 3), np.uint8)  # 70 MiB of zeros, compressed ~1000:1
    arrays["y_train"] = np.arange(6000) % 3
    np.savez_compressed(path, **arrays)
    with raises(r"compression ratio \d+:1 exceeds"):
        load_dataset_file(path)


# --- archives: happy paths ---------------------------------------------------------------


def test_zip_train_test_tree(tmp_path):
    train_entries = class_tree(prefix="train/")
    test_entries = class_tree(prefix="test/", per_class=2)
    path = write_zip(tmp_path / "d.zip", {**test_entries, **train_entries})  # order must not matter
    train, test = load_dataset_file(path)
    assert train.classes == test.classes == ["cat", "dog", "eel"]
    assert train.images.shape == (9, 3, 8, 8) and test.images.shape == (6, 3, 8, 8)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for dataset, entries in ((train, train_entries), (test, test_entries)):
        expected = np.stack([pixels.transpose(2, 0, 1) for _, pixels in sorted(decoded(entries).items())])
        assert np.array_equal(dataset.images.numpy(), expected)  # exact PNG round trip, sorted by path


def test_tar_gz_class_tree_split_is_deterministic(tmp_path):
    entries = {**class_tree(("a",), 10), **class_tree(("b",), 5), **class_tree(("c",), 2)}
    first = load_dataset_file(write_tar(tmp_path / "d.tar.gz", entries))
    shuffled = dict(reversed(list(entries.items())))
    second = load_dataset_file(write_tar(tmp_path / "again.tgz", shuffled))
    for one, two in zip(first, second, strict=True):
        assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    train, test = first
    assert train.classes == ["a", "b", "c"]
    assert test.labels.tolist() == [0, 0, 1, 2]  # round(20%): 2 of 10, 1 of 5, at least 1 of 2
    assert train.labels.tolist() == [0] * 8 + [1] * 4 + [2]
    everything = {bytes(img.numpy()) for img in torch.cat([train.images, test.images])}
    assert everything == {bytes(p.transpose(2, 0, 1)) for p in decoded(entries).values()}


def test_plain_tar_and_content_detection(tmp_path):
    path = write_tar(tmp_path / "upload", class_tree(), mode="w")  # no extension: ustar magic
    train, test = load_dataset_file(path)
    assert len(train) + len(test) == 9 and len(test) == 3
    assert inspect_dataset_file(path)["format"] == "tar"


@pytest.mark.parametrize("split", [True, False])
def test_single_top_level_folder_is_stripped(tmp_path, split):
    if split:
        entries = {**class_tree(("x", "y"), 3, prefix="mydata/train/"), **class_tree(("x", "y"), 1, prefix="mydata/test/")}
    else:
        entries = class_tree(("x", "y"), 3, prefix="mydata/")
    entries["__MACOSX/mydata/._junk.png"] = b"\x00\x05\x16\x07"  # ignored, like hidden files
    entries["mydata/x/.DS_Store"] = b"junk"
    entries["mydata/Thumbs.db"] = b"junk"
    summary = inspect_dataset_file(write_zip(tmp_path / "d.zip", entries))
    assert summary["classes"] == ["x", "y"] and summary["input_shape"] == (3, 8, 8)
    assert (summary["num_train"], summary["num_test"]) == ((6, 2) if split else (4, 2))


def test_greyscale_images_give_one_channel(tmp_path):
    entries = class_tree(("a", "b"), 3, make=grey)
    train, test = load_dataset_file(write_zip(tmp_path / "d.zip", entries))
    assert train.input_shape == (1, 8, 8)
    all_images = {bytes(img.numpy()) for img in torch.cat([train.images, test.images])}
    assert all_images == {bytes(p[None]) for p in decoded(entries).values()}


def test_mixed_grey_and_colour_become_rgb(tmp_path):
    grey_pixels, colour_pixels = grey(), rgb()
    entries = {"a/1.png": png(grey_pixels), "a/2.png": png(grey_pixels), "b/1.png": png(colour_pixels), "b/2.png": png(colour_pixels)}
    train, test = load_dataset_file(write_zip(tmp_path / "d.zip", entries))
    assert train.input_shape == (3, 8, 8)
    images = torch.cat([train.images, test.images]).numpy()
    assert any(np.array_equal(img, np.repeat(grey_pixels[None], 3, axis=0)) for img in images)
    assert any(np.array_equal(img, colour_pixels.transpose(2, 0, 1)) for img in images)


def test_16_bit_greyscale_is_scaled(tmp_path):
    pixels = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16).repeat(4, axis=0)
    entries = {f"{c}/{i}.png": png(pixels) for c in "ab" for i in range(2)}
    train, _ = load_dataset_file(write_zip(tmp_path / "d.zip", entries))
    assert train.images[0, 0, 0].tolist() == [0, 100, 255, 7]


# --- archives: hostile and broken --------------------------------------------------------


def test_truncated_archives(tmp_path):
    data = write_zip(tmp_path / "ok.zip", class_tree()).read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with raises(r"cut\.zip: the zip archive is truncated or corrupt"):
        load_dataset_file(tmp_path / "cut.zip")

    data = write_tar(tmp_path / "ok.tar.gz", class_tree()).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with raises(r"cut\.tar\.gz: .*truncated or corrupt"):
        load_dataset_file(tmp_path / "cut.tar.gz")
    (tmp_path / "tail.tar.gz").write_bytes(data[:-6])  # only the gzip trailer is missing
    with raises(r"tail\.tar\.gz: .*truncated or corrupt"):
        load_dataset_file(tmp_path / "tail.tar.gz")

    data = write_tar(tmp_path / "ok.tar", class_tree(), mode="w").read_bytes()
    for cut in (1024 * 4, 1024 * 4 + 100, 1024 * 4 + 512):  # at a header, inside one, in file data
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with raises(r"cut\.tar: .*truncated or corrupt"):
            load_dataset_file(tmp_path / "cut.tar")


def test_corrupt_zip_member_is_named(tmp_path):
    path = write_zip(tmp_path / "d.zip", class_tree(), compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    offset = data.index(b"IDAT")  # flip a byte inside the first PNG: CRC-32 check fails
    data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with raises(r"d\.zip: entry 'cat/00\.png' is truncated or corrupt"):
        load_dataset_file(path)


def test_random_bytes_and_unknown_formats(tmp_path):
    (tmp_path / "noise.zip").write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with raises(r"noise\.zip: unrecognised file format; accepted formats: \.npz"):
        load_dataset_file(tmp_path / "noise.zip")
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with raises(r"data\.csv: unrecognised file format"):
        load_dataset_file(tmp_path / "data.csv")
    (tmp_path / "empty.zip").write_bytes(b"")
    with raises(r"empty\.zip: the file is empty"):
        load_dataset_file(tmp_path / "empty.zip")
    np.save(tmp_path / "x.npy", np.zeros(3))
    with raises(r"x\.npy: this is a single \.npy array"):
        load_dataset_file(tmp_path / "x.npy")
    with raises(r"missing\.zip: the file cannot be read"):
        load_dataset_file(tmp_path / "missing.zip")
    (tmp_path / "noise.tar").write_bytes(b"\x01" * 2048)
    with raises(r"noise\.tar: the tar archive is truncated or corrupt"):
        load_dataset_file(tmp_path / "noise.tar")


@pytest.fixture(scope="module")
def zeros_50mb() -> bytes:
    return bytes(50 * 1024 * 1024)


def test_zip_bomb(tmp_path, zeros_50mb):
    path = write_zip(tmp_path / "bomb.zip", {**class_tree(), "cat/bomb.png": zeros_50mb})
    with raises(r"bomb\.zip: entry 'cat/bomb\.png': compression ratio \d+:1 exceeds the limit of 200:1"):
        load_dataset_file(path)


def test_tar_gz_bomb_counts_real_bytes(tmp_path, zeros_50mb):
    # a hidden member is skipped, not decoded, yet inflating past it is counted
    path = write_tar(tmp_path / "bomb.tgz", {**class_tree(), "cat/.bomb": zeros_50mb})
    with raises(r"bomb\.tgz: compression ratio \d+:1 exceeds the limit of 200:1"):
        load_dataset_file(path)
    path = write_tar(tmp_path / "bomb.tgz", {**class_tree(), "cat/bomb.png": zeros_50mb})
    with raises(r"bomb\.tgz: entry 'cat/bomb\.png' is 50\.0 MiB, too large for an image"):
        load_dataset_file(path)


def test_uncompressed_size_limit(tmp_path):
    entries = class_tree()
    with raises(r"d\.zip: .*uncompressed size exceeds the limit of 1000 bytes"):
        load_dataset_file(write_zip(tmp_path / "d.zip", entries), FileLimits(max_uncompressed_bytes=1000))
    with raises(r"d\.tar\.gz: .*uncompressed size exceeds the limit of 1000 bytes"):
        load_dataset_file(write_tar(tmp_path / "d.tar.gz", entries), FileLimits(max_uncompressed_bytes=1000))


def test_entry_image_and_class_limits(tmp_path):
    path = write_zip(tmp_path / "d.zip", class_tree())
    with raises(r"d\.zip: the archive has 9 entries, more than the limit of 5"):
        load_dataset_file(path, FileLimits(max_entries=5))
    with raises(r"d\.zip: more than the limit of 5 images"):
        load_dataset_file(path, FileLimits(max_images=5))
    with raises(r"d\.zip: entry 'cat/00\.png': the image is 8×8 pixels; the limit is 4 a side"):
        load_dataset_file(path, FileLimits(max_image_side=4))
    with raises(r"d\.zip: 3 classes is more than the limit of 2"):
        load_dataset_file(path, FileLimits(max_classes=2))
    tar = write_tar(tmp_path / "d.tar", class_tree(), mode="w")
    with raises(r"d\.tar: the archive has more than the limit of 5 entries"):
        load_dataset_file(tar, FileLimits(max_entries=5))


def test_path_traversal_in_zip(tmp_path):
    for name in ("../evil.png", "cat/../../evil.png", "/etc/x.png", "C:/x.png", "cat\\..\\..\\evil.png"):
        path = write_zip(tmp_path / "d.zip", {**class_tree(), name: png(rgb())})
        with raises(r"d\.zip: entry " + re.escape(repr(name)) + " has an unsafe path"):
            load_dataset_file(path)


@pytest.mark.parametrize("name", ["../evil.png", "/etc/x.png", "cat/../../../evil.png"])
def test_path_traversal_in_tar(tmp_path, name):
    member = tarfile.TarInfo(name)
    member.size = 10
    with raises(r"d\.tar: entry " + re.escape(repr(name)) + " has an unsafe path"):
        load_dataset_file(tar_with(tmp_path / "d.tar", member))


@pytest.mark.parametrize(
    "kind, match",
    [
        (tarfile.SYMTYPE, "is a symbolic link"),
        (tarfile.LNKTYPE, "is a hard link"),
        (tarfile.CHRTYPE, "is a device"),
        (tarfile.FIFOTYPE, "is a device"),
    ],
)
def test_links_and_devices_in_tar(tmp_path, kind, match):
    member = tarfile.TarInfo("a/link.png")
    member.type = kind
    member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "a/00.png"
    with raises(r"d\.tar\.gz: entry 'a/link\.png' " + match):
        load_dataset_file(tar_with(tmp_path / "d.tar.gz", member, mode="w:gz"))


def test_symlink_in_zip(tmp_path):
    path = tmp_path / "d.zip"
    write_zip(path, class_tree())
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("cat/link.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with raises(r"d\.zip: entry 'cat/link\.png' is a symbolic link"):
        load_dataset_file(path)


def test_encrypted_zip_entry(tmp_path):
    data = bytearray(write_zip(tmp_path / "d.zip", class_tree()).read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the 'encrypted' bit
        for match in re.finditer(re.escape(signature), bytes(data)):
            data[match.start() + flag_offset] |= 0x1
    (tmp_path / "d.zip").write_bytes(bytes(data))
    with raises(r"d\.zip: entry 'cat/00\.png' is encrypted"):
        load_dataset_file(tmp_path / "d.zip")


def test_non_image_file(tmp_path):
    path = write_zip(tmp_path / "d.zip", {**class_tree(), "cat/readme.txt": b"these are cats"})
    with raises(r"d\.zip: entry 'cat/readme\.txt': not an image file"):
        load_dataset_file(path)


def test_corrupt_image(tmp_path):
    broken = png(rgb())[:-30]
    path = write_tar(tmp_path / "d.tar.gz", {**class_tree(), "dog/broken.png": broken})
    with raises(r"d\.tar\.gz: entry 'dog/broken\.png': the image is truncated or corrupt"):
        load_dataset_file(path)


def test_mixed_image_sizes(tmp_path):
    path = write_zip(tmp_path / "d.zip", {**class_tree(), "eel/big.png": png(rgb(16))})
    with raises(r"mixed image sizes: entry 'eel/big\.png' is 16×16 pixels but 'cat/00\.png' is 8×8; .* or upload again with resize=8x8"):
        load_dataset_file(path)
    wide = {"a/0.png": png(RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)), **class_tree(("a", "b"), 2)}
    with raises(r"'a/0\.png' is 10×6; .* upload again with resize=10x6 to have every image resized to 10×6"):
        load_dataset_file(write_zip(tmp_path / "wide.zip", wide))


def test_single_class(tmp_path):
    with raises(r"d\.zip: only a single class \('cat'\)"):
        load_dataset_file(write_zip(tmp_path / "d.zip", class_tree(("cat",), 5)))
    with raises(r"d\.zip: only a single class \('cat'\)"):
        load_dataset_file(write_zip(tmp_path / "d.zip", class_tree(("cat",), 5, prefix="mydata/")))


def test_empty_class_folder(tmp_path):
    path = write_zip(tmp_path / "d.zip", {**class_tree(), "fox/": b"", "fox/.DS_Store": b"x"})
    with raises(r"d\.zip: class folder 'fox' has no images"):
        load_dataset_file(path)


def test_test_class_missing_from_train(tmp_path):
    entries = {**class_tree(("a", "b"), 2, prefix="train/"), **class_tree(("a", "zebra"), 2, prefix="test/")}
    with raises(r"d\.zip: test/zebra has no matching train/zebra folder"):
        load_dataset_file(write_zip(tmp_path / "d.zip", entries))


def test_bad_layouts(tmp_path):
    with raises(r"the test/ folder is missing"):
        load_dataset_file(write_zip(tmp_path / "d.zip", {**class_tree(prefix="train/"), "train/": b"", "test/": b""}))
    with raises(r"entry 'other/x\.png' is not at train/<class>/<image>"):
        load_dataset_file(
            write_zip(tmp_path / "d.zip", {**class_tree(prefix="train/"), **class_tree(prefix="test/"), "other/x.png": png(rgb())})
        )
    with raises(r"entry 'loose\.png' is not at <class>/<image>"):
        load_dataset_file(write_zip(tmp_path / "d.zip", {**class_tree(), "loose.png": png(rgb())}))
    with raises(r"each class needs at least 2 images"):
        load_dataset_file(write_zip(tmp_path / "d.zip", class_tree(per_class=1)))


def test_empty_archives(tmp_path):
    write_zip(tmp_path / "empty.zip", {})
    with raises(r"empty\.zip: no images found"):
        load_dataset_file(tmp_path / "empty.zip")
    write_zip(tmp_path / "dirs.zip", {"a/": b"", "b/": b"", "__MACOSX/._a": b"x"})
    with raises(r"dirs\.zip: no images found"):
        load_dataset_file(tmp_path / "dirs.zip")
    write_tar(tmp_path / "empty.tar.gz", {})
    with raises(r"empty\.tar\.gz: no images found"):
        load_dataset_file(tmp_path / "empty.tar.gz")


# --- decoded-size budget before decoding, resize -----------------------------------------


@pytest.fixture
def pixel_loads(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image whose pixels Pillow decodes (ImageFile.load), in order."""
    loads, original = [], ImageFile.ImageFile.load

    def load(self):
        if self.tile:  # pixels still to decode
            loads.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return loads


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixel data (IHDR, an empty IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def solid_png(side: int, colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, write", [("d.zip", write_zip), ("d.tar.gz", write_tar)])
def test_decoded_size_limit_before_any_pixel_is_decoded(tmp_path, pixel_loads, name, write):
    path = write(tmp_path / name, class_tree())  # 9 images of 3×8×8 = 192 bytes
    with raises(
        re.escape(name) + r": entry 'dog/02\.png': the images decode to 1\.1 KiB \(6 images of 3×8×8 pixels so far\), "
        r"more than the limit of 1000 bytes for decoded images; upload fewer or smaller images"
    ):
        load_dataset_file(path, FileLimits(max_decoded_bytes=1000))
    assert pixel_loads == []
    load_dataset_file(path, FileLimits(max_decoded_bytes=9 * 192))
    assert pixel_loads == [(8, 8)] * 9  # each image decoded once


def test_npz_decoded_size_limit(tmp_path):
    path = save_npz(tmp_path / "d.npz", **npz_arrays())
    with raises(r"d\.npz: the images decode to 3\.4 KiB \(18 images of 3×8×8 pixels\), more than the limit of 1000 bytes"):
        load_dataset_file(path, FileLimits(max_decoded_bytes=1000))
    with raises(r"d\.npz: the images decode to 13\.5 KiB \(18 images of 3×16×16 pixels\), more than the limit"):
        load_dataset_file(path, FileLimits(max_decoded_bytes=10_000), resize=(16, 16))


def test_decompression_bomb_of_small_pngs_is_refused_before_decoding(tmp_path, pixel_loads):
    # 40 single-colour 256×256 PNGs: their files are tiny, their pixels 7.5 MiB
    entries = {f"{c}/{i:02d}.png": solid_png(256, (i, 0, 0)) for c in "ab" for i in range(20)}
    path = write_zip(tmp_path / "d.zip", entries)
    with raises(
        r"d\.zip: entry '.*': the images decode to .* from a file of .* KiB, a ratio of \d+:1 over the limit "
        r"of 200:1 \(this looks like a decompression bomb\)"
    ):
        load_dataset_file(path)
    assert pixel_loads == []


def test_resize_cannot_blow_small_images_up(tmp_path, pixel_loads):
    path = write_zip(tmp_path / "d.zip", class_tree(per_class=6))  # 18 tiny PNGs → 18×3×512×512 = 13.5 MiB
    with raises(r"d\.zip: entry '.*': the images decode to .* a ratio of \d+:1 over the limit of 200:1"):
        load_dataset_file(path, resize=(512, 512))
    assert pixel_loads == []


def test_huge_image_headers_are_refused_without_decoding(tmp_path, pixel_loads):
    path = write_zip(tmp_path / "d.zip", {**class_tree(), "cat/huge.png": png_header(5000, 5000)})
    with raises(r"d\.zip: entry 'cat/huge\.png': the image is 5000×5000 pixels; the limit is 512 a side"):
        load_dataset_file(path)
    path = write_zip(tmp_path / "d.zip", {**class_tree(), "cat/bomb.png": png_header(20_000, 20_000)})
    with raises(r"d\.zip: entry 'cat/bomb\.png': the image is far too large \(Image size \(400000000 pixels\) exceeds"):
        load_dataset_file(path)  # Pillow's decompression-bomb guard
    assert pixel_loads == []


def test_layout_problems_are_found_before_decoding(tmp_path, pixel_loads):
    with raises(r"d\.zip: only a single class"):
        load_dataset_file(write_zip(tmp_path / "d.zip", class_tree(("cat",), 5)))
    with raises(r"d\.zip: entry 'loose\.png' is not at <class>/<image>"):
        load_dataset_file(write_zip(tmp_path / "d.zip", {**class_tree(), "loose.png": png(rgb())}))
    assert pixel_loads == []


def resized(data: bytes, height: int, width: int) -> np.ndarray:
    """What resize should give: Pillow's bilinear resize of the image as RGB, C×H×W."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


@pytest.mark.parametrize("name, write", [("d.zip", write_zip), ("d.tgz", write_tar)])
def test_resize_makes_mixed_sizes_one_size(tmp_path, name, write):
    images = {"a/0.png": rgb(8), "a/1.png": rgb(16), "a/2.png": grey(12), "b/0.png": rgb(5), "b/1.png": rgb(6)[:, :4]}
    images["b/2.png"] = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # already 6 high, 10 wide: kept as it is
    entries = {f"{subset}/{path}": png(pixels) for subset in ("train", "test") for path, pixels in images.items()}
    path = write(tmp_path / name, entries)
    with raises(r"mixed image sizes"):
        load_dataset_file(path)

    train, test = load_dataset_file(path, resize=(6, 10))
    assert train.input_shape == test.input_shape == (3, 6, 10)
    for dataset, subset in ((train, "train"), (test, "test")):
        expected = [resized(entries[f"{subset}/{p}"], 6, 10) for p in sorted(images)]
        assert np.array_equal(dataset.images.numpy(), np.stack(expected))
    assert np.array_equal(train.images[5].numpy(), images["b/2.png"].transpose(2, 0, 1))


def test_resize_of_greyscale_archives_and_npz(tmp_path):
    entries = class_tree(("a", "b"), 2, make=grey)
    train, test = load_dataset_file(write_zip(tmp_path / "d.zip", entries), resize=(4, 4))
    assert train.input_shape == (1, 4, 4)
    all_images = {bytes(img.numpy()) for img in torch.cat([train.images, test.images])}
    assert all_images == {bytes(resized(data, 4, 4)[:1]) for data in entries.values()}

    arrays = npz_arrays(shape=(8, 8))
    arrays["x_test"] = RNG.integers(0, 256, (6, 12, 12), dtype=np.uint8)  # another size: fine with resize
    train, test = load_dataset_file(save_npz(tmp_path / "d.npz", **arrays), resize=(8, 8))
    assert np.array_equal(train.images.numpy(), arrays["x_train"][:, None])  # the right size already: untouched
    expected = [np.asarray(Image.fromarray(x).resize((8, 8), Image.Resampling.BILINEAR)) for x in arrays["x_test"]]
    assert np.array_equal(test.images.numpy(), np.stack(expected)[:, None])


def test_npz_resize_of_float_nchw_images(tmp_path):
    arrays = npz_arrays(shape=(3, 8, 8))
    as_uint8 = arrays["x_train"].transpose(0, 2, 3, 1)
    arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    train, _ = load_dataset_file(save_npz(tmp_path / "d.npz", **arrays), resize=(5, 7))
    expected = [np.asarray(Image.fromarray(x).resize((7, 5), Image.Resampling.BILINEAR)).transpose(2, 0, 1) for x in as_uint8]
    assert np.array_equal(train.images.numpy(), np.stack(expected))


def test_npz_shape_mismatch_messages(tmp_path):
    arrays = npz_arrays()
    arrays["x_test"] = np.zeros((6, 4, 4, 3), np.uint8)
    with raises(r"train and test images differ in shape: .*; save them at one size, or upload again with resize=8x8"):
        load_dataset_file(save_npz(tmp_path / "d.npz", **arrays))
    arrays["x_test"] = np.zeros((6, 8, 8, 1), np.uint8)
    with raises(r"x_train is \(3, 8, 8\) and x_test is \(1, 8, 8\) \(C, H, W\); save them with one channel count"):
        load_dataset_file(save_npz(tmp_path / "d.npz", **arrays), resize=(8, 8))


@pytest.mark.parametrize("resize", [(0, 8), (8, 513), (8,), (8, 8, 3), (8.0, 8), (True, 8), "32x32", 32])
def test_invalid_resize(tmp_path, resize):
    path = write_zip(tmp_path / "d.zip", class_tree())
    with raises(r"d\.zip: resize=.* is not a size; give \(height, width\) in pixels, each from 1 to 512"):
        load_dataset_file(path, resize=resize)


def test_parse_resize():
    assert parse_resize("32x24") == (24, 32)  # WIDTHxHEIGHT, as the messages suggest it → (height, width)
    assert parse_resize(" 10 X 6 ") == parse_resize("10×6") == (6, 10)
    for text in ("32", "0x5", "ax4", "-3x4", "32x24x3", ""):
        with raises(r"resize '.*': give the size as WIDTHxHEIGHT in pixels, e.g\. 32x32"):
            parse_resize(text)


def test_inspect_fingerprint_is_the_loaded_datasets_and_depends_on_resize(tmp_path):
    archive = write_zip(tmp_path / "d.zip", {**class_tree(), "eel/big.png": png(rgb(16))})
    npz = save_npz(tmp_path / "d.npz", **npz_arrays())
    seen = set()
    for path, resize in ((archive, (8, 8)), (archive, (4, 6)), (npz, None), (npz, (5, 5))):
        summary = inspect_dataset_file(path, resize=resize)
        assert summary["fingerprint"] == fingerprint(*load_dataset_file(path, resize=resize))
        assert summary["resize"] == resize
        assert summary["input_shape"] == (3, *(resize or (8, 8)))
        seen.add(summary["fingerprint"])
    assert len(seen) == 4


# --- .npz read as a stream ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.dtype(">f8")])
def test_npz_fortran_order_and_byte_order(tmp_path, dtype):
    arrays = npz_arrays(n_train=40)
    expected = arrays["x_train"].transpose(0, 3, 1, 2)
    scale = 1 if np.dtype(dtype) == np.uint8 else 255
    arrays["x_train"] = np.asfortranarray((arrays["x_train"] / scale).astype(dtype))
    np.savez_compressed(tmp_path / "d.npz", **arrays)
    train, _ = load_dataset_file(tmp_path / "d.npz")
    assert np.array_equal(train.images.numpy(), expected)


def npz_with_x_train(path, images: np.ndarray, declared_shape: tuple[int, ...]):
    """An .npz whose x_train header declares `declared_shape` over the data of `images`."""
    arrays = npz_arrays()
    arrays["y_train"] = np.arange(declared_shape[0]) % 3
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            with zf.open(f"{key}.npy", "w") as f:
                if key == "x_train":
                    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": declared_shape})
                    f.write(images.tobytes())
                else:
                    np.lib.format.write_array(f, array)
    return path


def test_npz_member_shorter_or_longer_than_its_header(tmp_path):
    images = RNG.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    with raises(r"d\.npz: the \.npz file is truncated or corrupt \(array x_train ends before the data its header declares\)"):
        load_dataset_file(npz_with_x_train(tmp_path / "d.npz", images, (13, 8, 8, 3)))
    with raises(r"d\.npz: the \.npz file is truncated or corrupt \(array x_train has more data than its header declares\)"):
        load_dataset_file(npz_with_x_train(tmp_path / "d.npz", images, (11, 8, 8, 3)))
    train, _ = load_dataset_file(npz_with_x_train(tmp_path / "d.npz", images, (12, 8, 8, 3)))
    assert np.array_equal(train.images.numpy(), images.transpose(0, 3, 1, 2))
