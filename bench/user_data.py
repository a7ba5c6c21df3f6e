"""A dataset as users bring them: photo-like textures cut from four large generated surfaces (brick, grass,
gravel, bark), as a zip of class folders — so its test split is sorted by class, as every folder dataset's
is. It stands in for the crops of real photographs (scikit-image's brick, grass, gravel…) that a new-user
trial used, without shipping or downloading any photograph:

    python -m bench.user_data textures.zip                  # 150 train + 50 test crops per class, 32×32 RGB
    python -m bench.user_data textures.zip --train 100 --test 30 --size 24

Each class is one surface; crops for training come from its top part and crops for testing from its
bottom part (no pixel in both), each with its own brightness, contrast and tint, so that a model must learn
the texture, not the crop's colour. Deterministic for a seed."""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("brick", "grass", "gravel", "bark")
SURFACE = 512  # side of each generated surface
TEST_ROWS = 0.3  # the bottom part of each surface, where the test crops come from


def _noise(g: np.random.Generator, shape: tuple[int, int], power: float, stretch: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """1/f^power noise, normalised to [0, 1]; `stretch` elongates it along (rows, columns)."""
    fy = np.fft.fftfreq(shape[0])[:, None] * stretch[0]
    fx = np.fft.fftfreq(shape[1])[None, :] * stretch[1]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(shape)) ** power
    field = np.fft.ifft2(amplitude * np.exp(2j * np.pi * g.random(shape))).real
    return (field - field.min()) / (field.max() - field.min())


def brick(g: np.random.Generator) -> np.ndarray:
    rows, cols = np.mgrid[:SURFACE, :SURFACE]
    height, width, mortar = 22, 50, 3
    course = rows // height
    shifted = cols + (course % 2) * width // 2
    brick_id = course * 1000 + shifted // width
    shade = g.uniform(0.35, 0.65, brick_id.max() + 1)[brick_id]
    joints = (rows % height < mortar) | (shifted % width < mortar)
    surface = np.where(joints, 0.85, shade) + 0.12 * (_noise(g, rows.shape, 0.8) - 0.5)
    return surface + 0.15 * (_noise(g, rows.shape, 2.5) - 0.5)  # uneven light


def grass(g: np.random.Generator) -> np.ndarray:
    surface = 0.45 + 0.2 * (_noise(g, (SURFACE, SURFACE), 1.5) - 0.5)
    for _ in range(9000):  # blades: short strokes, mostly upright, dark or light
        r, c = g.uniform(0, SURFACE, 2)
        angle, length = g.normal(np.pi / 2, 0.3), g.uniform(6, 22)
        t = np.linspace(0, 1, int(length))
        rr = np.clip(r - t * length * np.sin(angle), 0, SURFACE - 1).astype(int)
        cc = np.clip(c + t * length * np.cos(angle), 0, SURFACE - 1).astype(int)
        surface[rr, cc] = g.uniform(0.1, 0.9)
    return surface


def gravel(g: np.random.Generator) -> np.ndarray:
    """Pebbles: the cells of random seeds, each a grey of its own, darker towards its edge."""
    seeds = g.uniform(0, SURFACE, (700, 2))
    tone = g.uniform(0.25, 0.8, len(seeds))
    rows, cols = np.mgrid[:SURFACE, :SURFACE]
    points = np.stack([rows.ravel(), cols.ravel()], 1).astype(np.float32)
    nearest = np.empty(len(points), np.int64)
    first = np.empty(len(points), np.float32)
    second = np.empty(len(points), np.float32)
    for start in range(0, len(points), 16384):
        d = ((points[start : start + 16384, None, :] - seeds[None].astype(np.float32)) ** 2).sum(-1)
        order = np.argpartition(d, 1, axis=1)[:, :2]
        two = np.take_along_axis(d, order, 1)
        swap = two[:, 0] > two[:, 1]
        nearest[start : start + 16384] = np.where(swap, order[:, 1], order[:, 0])
        first[start : start + 16384], second[start : start + 16384] = np.sort(two, 1).T
    edge = np.sqrt(second) - np.sqrt(first)  # distance to the cell's border
    surface = tone[nearest] * np.clip(edge / 4, 0.3, 1.0)
    return surface.reshape(SURFACE, SURFACE) + 0.1 * (_noise(g, (SURFACE, SURFACE), 0.5) - 0.5)


def bark(g: np.random.Generator) -> np.ndarray:
    ridges = _noise(g, (SURFACE, SURFACE), 1.8, stretch=(0.15, 1.0))  # long horizontal grain
    return 0.2 + 0.6 * ridges**1.5 + 0.1 * (_noise(g, (SURFACE, SURFACE), 1.0) - 0.5)


SURFACES = {"brick": brick, "grass": grass, "gravel": gravel, "bark": bark}


def crops(surface: np.ndarray, n: int, size: int, test: bool, g: np.random.Generator) -> np.ndarray:
    """n RGB uint8 crops (size×size×3) from the surface's test rows (bottom) or training rows (top)."""
    split = int(SURFACE * (1 - TEST_ROWS))
    low, high = (split, SURFACE - size) if test else (0, split - size)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        r, c = g.integers(low, high + 1), g.integers(0, SURFACE - size + 1)
        patch = surface[r : r + size, c : c + size]
        patch = (patch - patch.mean()) * g.uniform(0.5, 0.9) + patch.mean() + g.uniform(-0.12, 0.12)  # duller light than the surface
        tint = g.uniform(0.8, 1.2, 3)
        out[i] = (np.clip(patch[..., None] * tint, 0, 1) * 255).round().astype(np.uint8)
    return out


def make(n_train: int = 150, n_test: int = 50, size: int = 32, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{"train"|"test": {class: N×size×size×3 uint8}}."""
    g = np.random.default_rng(seed)
    data: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    for name in CLASSES:
        surface = SURFACES[name](g)
        surface = (surface - surface.min()) / (surface.max() - surface.min())
        data["train"][name] = crops(surface, n_train, size, False, g)
        data["test"][name] = crops(surface, n_test, size, True, g)
    return data


def write_zip(path: Path, n_train: int = 150, n_test: int = 50, size: int = 32, seed: int = 0) -> Path:
    """The dataset as users upload it: train/<class>/<n>.png and test/<class>/<n>.png."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for split, classes in make(n_train, n_test, size, seed).items():
            for name, images in classes.items():
                for i, image in enumerate(images):
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    archive.writestr(f"{split}/{name}/{i:04d}.png", buffer.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--train", type=int, default=150, help="training crops per class")
    parser.add_argument("--test", type=int, default=50, help="test crops per class")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_zip(args.path, args.train, args.test, args.size, args.seed))


if __name__ == "__main__":
    main()
