"""Validating an upload imports no torch: the API checks every upload with inspect_dataset_file, and
torch (with pyautoattack and the model zoo) is for the worker that trains. Each check runs in a fresh
Python, so nothing the test process imported can hide an import."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "pyautoattack", "peeraid_models")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run_fresh(code: str, *args: str) -> None:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> list[Path]:
    """One file of each format; the folder archives without train/test folders, so a test split is made."""
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    entries = {f"mydata/{c}/{i}.png": png(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)) for c in "abc" for i in range(4)}
    with zipfile.ZipFile(folder / "tree.zip", "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    with tarfile.open(folder / "tree.tar.gz", "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    np.savez(
        folder / "arrays.npz",
        x_train=rng.random((8, 6, 6, 3), dtype=np.float32),
        y_train=np.arange(8) % 2,
        x_test=rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8),
        y_test=np.arange(4) % 2,
    )
    return [folder / "tree.zip", folder / "tree.tar.gz", folder / "arrays.npz"]


def test_inspecting_an_upload_imports_no_torch(uploads):
    code = f"""
import sys
from pathlib import Path
from core.engine.dataset_files import inspect_dataset_file, parse_resize
from core.engine.errors import DatasetError

for path in sys.argv[1:]:
    for resize in (None, parse_resize("5x4")):
        summary = inspect_dataset_file(Path(path), resize=resize)
        assert summary["num_train"] and summary["num_test"], summary
try:
    inspect_dataset_file(Path(sys.argv[1]).with_name("missing.zip"))
except DatasetError:
    pass
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
assert not loaded, "inspecting an upload imported " + ", ".join(loaded)
"""
    run_fresh(code, *map(str, uploads))


def test_the_engine_package_imports_lazily():
    code = f"""
import sys
import core.engine
import core.engine.dataset_files
assert not any(m.split(".")[0] in {HEAVY!r} for m in sys.modules), "import core.engine imported torch"
from core.engine import EngineError, build_spec, run_job, load_model, load_splits, create_model, list_models, PRESETS, JobSpec
assert "torch" in sys.modules and callable(run_job) and "digits-demo" in PRESETS
assert set(core.engine.__all__) <= set(dir(core.engine))
"""
    run_fresh(code)


def test_the_inspection_and_the_torch_loader_agree(uploads):
    from core.engine.dataset_files import inspect_dataset_file, load_dataset_file
    from core.engine.datasets import fingerprint

    for path in uploads:
        summary = inspect_dataset_file(path, resize=(4, 5))
        train, test = load_dataset_file(path, resize=(4, 5))
        assert summary["fingerprint"] == fingerprint(train, test)
        assert (summary["num_train"], summary["num_test"], summary["input_shape"]) == (len(train), len(test), train.input_shape)
