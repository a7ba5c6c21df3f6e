"""The built-in datasets, torch-free: what each is, and the shape of its data as `core.engine.sources` loads it
(a test keeps the two in step). The API validates and estimates jobs on them without loading them."""

from __future__ import annotations

from .estimates import DataShape

BUILTIN_DATASETS = {
    "digits": "scikit-learn's bundled 8×8 handwritten digits (UCI), upscaled to 16×16 grey; 10 classes, 1,797 images. Needs no network.",
    "cifar10": "CIFAR-10 via torchvision (32×32 RGB, 10 classes, 50,000 train / 10,000 test).",
    "cifar100": "CIFAR-100 via torchvision (32×32 RGB, 100 classes, 50,000 train / 10,000 test).",
    "tinyimagenet": "TinyImageNet-200 from its standard folder layout (64×64 RGB, 200 classes).",
}

BUILTIN_SHAPES = {
    "digits": DataShape(1, 16, 16, 10, 1438, 359),
    "cifar10": DataShape(3, 32, 32, 10, 50_000, 10_000),
    "cifar100": DataShape(3, 32, 32, 100, 50_000, 10_000),
    "tinyimagenet": DataShape(3, 64, 64, 200, 100_000, 10_000),
}
