"""Name → factory registry of image classifiers, in the manner of timm's `create_model`.

A factory builds a network from (num_classes, in_channels) alone: every architecture here pools
its last feature map adaptively, so it takes any input at least `min_input_size` on a side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .errors import ArchitectureError, InputTooSmallError, UnknownArchitectureError

Factory = Callable[[int, int], nn.Module]
_LARGEST_MINIMUM_SEARCHED = 256


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    description: str
    family: str
    factory: Factory = field(repr=False, compare=False)

    @cached_property
    def min_input_size(self) -> int:
        """The smallest square input on which one image passes a train-mode forward.

        An epoch's last batch can hold a single image, and BatchNorm in train mode needs more than
        one value per channel, so the deepest feature map must be at least 2 pixels: 9 for the
        networks that downsample 8×, 5 for those that downsample 4×. Found by a dry forward on the
        meta device (no memory, no arithmetic), so it follows the code."""
        with torch.device("meta"):
            model = self.factory(2, 3).train()
            for size in range(1, _LARGEST_MINIMUM_SEARCHED + 1):
                try:
                    model(torch.empty(1, 3, size, size))
                except (ValueError, RuntimeError):
                    continue
                return size
        raise ArchitectureError(f"{self.name} rejects every input up to {_LARGEST_MINIMUM_SEARCHED}×{_LARGEST_MINIMUM_SEARCHED}")

    def num_params(self, num_classes: int = 10, in_channels: int = 3) -> int:
        _validate(num_classes, in_channels)
        with torch.device("meta"):
            model = self.factory(num_classes, in_channels)
        return sum(p.numel() for p in model.parameters())

    def check_input_size(self, height: int, width: int) -> None:
        """Raise InputTooSmallError if images of height × width are too small for this architecture."""
        if min(height, width) < self.min_input_size:
            raise InputTooSmallError(self.name, self.min_input_size, height, width)


_REGISTRY: dict[str, ArchitectureInfo] = {}


def register_model(name: str, *, description: str, family: str = "") -> Callable[[Factory], Factory]:
    def decorator(fn: Factory) -> Factory:
        if name in _REGISTRY:
            raise ArchitectureError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ArchitectureInfo(name, description, family or name, fn)
        return fn

    return decorator


def list_models() -> list[ArchitectureInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_model_info(name: str) -> ArchitectureInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(f"unknown architecture {name!r}; known architectures: {', '.join(sorted(_REGISTRY))}") from None


def _check_int(arg: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArchitectureError(f"{arg} must be an integer >= {minimum}, got {value!r}")


def _validate(num_classes: int, in_channels: int) -> None:
    _check_int("num_classes", num_classes, 2)
    _check_int("in_channels", in_channels, 1)


def create_model(name: str, *, num_classes: int, in_channels: int = 3) -> nn.Module:
    info = get_model_info(name)
    _validate(num_classes, in_channels)
    return info.factory(num_classes, in_channels)
