"""Peak memory of validating an upload: each dataset is inspected in a fresh process
(tests/upload_memory_probe.py), which reports how far its peak RSS rose above the RSS it held right
before validating.

The bound is one copy of the decoded dataset (uint8 N×C×H×W) plus ALLOWANCE: what
`dataset_files` promises, and half of the "2× decoded + allowance" the security review asked for.

To measure an earlier, single-file version of dataset_files.py (e.g. the one before the two-pass loader), point
UPLOAD_MEMORY_MODULE at a copy of it:

    git show 10bbcb0~1:core/engine/dataset_files.py > /tmp/old_dataset_files.py
    UPLOAD_MEMORY_MODULE=/tmp/old_dataset_files.py .venv/bin/python -m pytest -q -s tests/test_upload_memory.py
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROBE = Path(__file__).with_name("upload_memory_probe.py")
MODULE = os.environ.get("UPLOAD_MEMORY_MODULE")
MIB = 1024**2
# What a validation holds besides the decoded arrays, independent of the dataset's size: an .npz
# conversion block (4 MiB of float64, its float32 source and uint8 result), 1 MiB zip/gzip reads and
# one image file and its decoded pixels, and allocator slack; plus the paths kept per image (under
# 1 KiB each, 3 MiB for the 3,000 images here).
ALLOWANCE = 16 * MIB
RNG = np.random.default_rng(0)

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset and read the peak RSS"),
    pytest.mark.slow,  # each test starts a fresh Python and validates a dataset of thousands of images
]


def measure(dataset: Path, warm_up: Path, resize: str | None = None) -> dict:
    command = [sys.executable, str(PROBE), str(dataset), "--warm-up", str(warm_up)]
    command += ["--module", MODULE] if MODULE else []
    command += ["--resize", resize] if resize else []
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def report(label: str, figures: dict, decoded: int) -> None:
    growth = figures["growth_kib"] * 1024
    print(
        f"\n{label}: file {figures['file_bytes'] / MIB:.1f} MiB, decoded {decoded / MIB:.1f} MiB; RSS before "
        f"{figures['baseline_kib'] / 1024:.1f} MiB, peak {figures['peak_kib'] / 1024:.1f} MiB, growth "
        f"{growth / MIB:.1f} MiB = {growth / max(decoded, 1):.2f}× decoded (bound {(decoded + ALLOWANCE) / MIB:.1f} MiB)"
    )


def png(pixels: np.ndarray, level: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def class_tree(images, classes: int = 10) -> dict[str, bytes]:
    return {f"class{i % classes}/{i:05d}.png": png(pixels) for i, pixels in enumerate(images)}


def write_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def write_tar_gz(path: Path, entries: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez_compressed's format, at deflate level 1 to keep the test quick."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, array in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array)
    return path


def noise(n: int, side: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def with_file_size(figures: dict, path: Path) -> dict:
    return {**figures, "file_bytes": path.stat().st_size}


N, SIDE = 3000, 48  # 20 MiB decoded


@pytest.fixture(scope="module")
def png_tree() -> dict[str, bytes]:
    return class_tree(noise(N, SIDE))


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_of_pngs_costs_one_decoded_copy(tmp_path, png_tree, kind):
    n, side = N, SIDE
    write = write_zip if kind == "zip" else write_tar_gz
    dataset = write(tmp_path / f"d.{kind}", png_tree)
    warm_up = write(tmp_path / f"warm-up.{kind}", class_tree(noise(4, side), classes=2))
    decoded = n * 3 * side * side
    figures = with_file_size(measure(dataset, warm_up), dataset)
    report(kind, figures, decoded)
    assert figures["summary"]["num_train"] + figures["summary"]["num_test"] == n
    assert figures["growth_kib"] * 1024 <= decoded + ALLOWANCE


def test_compressed_float_npz_costs_one_decoded_copy(tmp_path):
    n, side = N, SIDE
    tiles = RNG.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    images = np.tile(tiles, (1, side // 8, side // 8, 1)).astype(np.float32) / 255  # 4 bytes a pixel
    split = n * 4 // 5
    arrays = {"x_train": images[:split], "y_train": np.arange(split) % 10, "x_test": images[split:], "y_test": np.arange(n - split) % 10}
    dataset = write_npz(tmp_path / "d.npz", arrays)
    warm_up = write_npz(tmp_path / "warm-up.npz", {k: v[:4] for k, v in arrays.items()})
    del images, arrays
    decoded = n * 3 * side * side  # as uint8
    figures = with_file_size(measure(dataset, warm_up), dataset)
    report("npz (float32, deflated)", figures, decoded)
    assert figures["summary"]["input_shape"] == [3, side, side]
    assert figures["growth_kib"] * 1024 <= decoded + ALLOWANCE


def test_resize_decodes_at_the_target_size(tmp_path):
    if MODULE:
        pytest.skip("resize is new with the two-pass loader")
    n = 1500
    images = [RNG.integers(0, 256, (64 + 16 * (i % 2), 64, 3), dtype=np.uint8) for i in range(n)]  # 21 MiB decoded
    dataset = write_zip(tmp_path / "d.zip", class_tree(images))
    warm_up = write_zip(tmp_path / "warm-up.zip", class_tree(images[:4], classes=2))
    decoded = n * 3 * 32 * 32  # 4.4 MiB at 32×32
    figures = with_file_size(measure(dataset, warm_up, resize="32x32"), dataset)
    report("zip resized to 32x32", figures, decoded)
    assert figures["summary"]["input_shape"] == [3, 32, 32] and figures["summary"]["resize"] == [32, 32]
    assert figures["growth_kib"] * 1024 <= decoded + ALLOWANCE


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    """400 single-colour 256×256 PNGs: a 90 KiB zip that decodes to 75 MiB (850:1)."""
    images = [np.full((256, 256, 3), (i % 256, 7, 9), np.uint8) for i in range(400)]
    entries = {f"c{i % 2}/{i:03d}.png": png(p, level=9) for i, p in enumerate(images)}
    dataset = write_zip(tmp_path / "bomb.zip", entries, zipfile.ZIP_DEFLATED)
    warm_up = write_zip(tmp_path / "warm-up.zip", class_tree(noise(4, 8), classes=2))
    figures = with_file_size(measure(dataset, warm_up), dataset)
    report("decompression bomb", figures, 400 * 3 * 256 * 256)
    assert figures["growth_kib"] * 1024 <= ALLOWANCE
    assert "looks like a decompression bomb" in figures.get("error", "accepted")
