"""Portable weights (safetensors, never pickle) and the JSON model card.

A weights file carries its architecture in the safetensors header, so `load_model(path)`
rebuilds the network without any other file (timm-style portable checkpoints)."""

from __future__ import annotations

import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import create_model
from .state_io import atomic_write, load_tensors, save_tensors

WEIGHTS_FORMAT = "peeraid-service/weights-v1"


def save_weights(model: nn.Module, path: Path, *, architecture: str, num_classes: int, input_shape, classes: list[str]) -> None:
    in_channels, height, _width = input_shape
    save_tensors(
        path,
        model.state_dict(),
        {
            "format": WEIGHTS_FORMAT,
            "architecture": architecture,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": height,
            "classes": classes,
        },
    )


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a weights file describes and load it (strict), in eval mode."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a weights file of this service (format {meta.get('format')!r})")
    model = create_model(
        meta["architecture"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], input_size=meta["input_size"]
    )
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), meta


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "safetensors", "pyautoattack", "numpy", "pydantic", "peeraid-service"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
