"""The `small-data` preset on data it is meant for: a generated 3-class shapes dataset (32×32 RGB,
a few hundred images per class) and the built-in digits. `make_shapes` also writes the .npz the
README's figures were measured on (`python -m tests.test_small_data_preset shapes.npz`)."""

import sys
from pathlib import Path

import numpy as np
import pytest

from core.engine.job import run_job
from core.engine.sources import load_splits
from core.engine.spec import build_spec

SHAPES = ("disk", "square", "triangle")


def make_shapes(n_per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Filled shapes of random position, size and colour on a random background, with pixel noise."""
    g = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images, labels = [], []
    for label in range(len(SHAPES)):
        for _ in range(n_per_class):
            r = g.uniform(0.15, 0.3) * size
            cy, cx = g.uniform(r, size - r, 2)
            if label == 0:
                mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
            elif label == 1:
                mask = (abs(rows - cy) <= r * 0.85) & (abs(cols - cx) <= r * 0.85)
            else:
                mask = (rows >= cy - r) & (rows <= cy + r) & (abs(cols - cx) <= (rows - (cy - r)) / 2)
            background, foreground = g.uniform(0, 1, 3), g.uniform(0, 1, 3)
            while np.abs(foreground - background).sum() < 0.6:
                foreground = g.uniform(0, 1, 3)
            image = np.where(mask[..., None], foreground, background) + g.normal(0, 0.05, (size, size, 3))
            images.append((image.clip(0, 1) * 255).round().astype(np.uint8))
            labels.append(label)
    order = g.permutation(len(labels))
    return np.stack(images)[order], np.array(labels)[order]


def write_shapes(path: Path, n_train_per_class: int = 300, n_test_per_class: int = 100) -> Path:
    x_train, y_train = make_shapes(n_train_per_class, seed=0)
    x_test, y_test = make_shapes(n_test_per_class, seed=1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_shapes_are_three_balanced_classes_of_rgb_images(tmp_path):
    splits = load_splits(str(write_shapes(tmp_path / "shapes.npz", 20, 5)), val_fraction=0.2)
    assert splits.input_shape == (3, 32, 32) and len(splits.classes) == 3
    assert len(splits.train) + len(splits.val) == 60 and len(splits.test) == 15


def test_the_small_data_preset_fits_small_user_datasets():
    spec = build_spec("small-data", {"dataset": "mine.npz"})
    assert (spec.student, spec.peer_architecture, spec.selection) == ("small_cnn", "small_cnn", "validation")
    assert spec.decay_epochs == [20, 25] and build_spec("small-data", {"epochs": 9}).decay_epochs == [6, 8]
    assert spec.attack_steps * spec.attack_step_size >= spec.epsilon  # the training attack can reach the ε-ball's edge


@pytest.mark.slow
def test_small_data_preset_makes_a_robust_student_on_generated_shapes(tmp_path):
    path = write_shapes(tmp_path / "shapes.npz", 100, 30)
    spec = build_spec("small-data", {"dataset": str(path), "epochs": 12, "evaluation": {"autoattack": False}})
    splits = load_splits(spec.dataset, val_fraction=spec.val_fraction, seed=spec.seed)
    test = run_job(spec, splits, tmp_path / "run").report["student"]["test"]
    assert test["clean_acc"] >= 0.6 and test["pgd20_acc"] >= 0.45  # chance is 1/3


if __name__ == "__main__":
    print(write_shapes(Path(sys.argv[1])))
