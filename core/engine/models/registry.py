"""Name → factory registry of image classifiers, in the manner of timm's `create_model`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import UnknownArchitectureError

Factory = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    description: str
    family: str
    min_input_size: int
    factory: Factory = field(repr=False, compare=False)

    def num_params(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> int:
        _validate(self, num_classes, in_channels, input_size)
        with torch.device("meta"):
            model = self.factory(num_classes, in_channels, input_size)
        return sum(p.numel() for p in model.parameters())


_REGISTRY: dict[str, ArchitectureInfo] = {}


def register_model(name: str, *, description: str, min_input_size: int = 8, family: str = "") -> Callable[[Factory], Factory]:
    def decorator(fn: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ArchitectureInfo(name, description, family or name, min_input_size, fn)
        return fn

    return decorator


def list_models() -> list[ArchitectureInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_model_info(name: str) -> ArchitectureInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; known architectures: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _check_int(arg: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")


def _validate(info: ArchitectureInfo, num_classes: int, in_channels: int, input_size: int) -> None:
    _check_int("num_classes", num_classes, 2)
    _check_int("in_channels", in_channels, 1)
    _check_int("input_size", input_size, info.min_input_size)


def create_model(name: str, *, num_classes: int, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    info = get_model_info(name)
    _validate(info, num_classes, in_channels, input_size)
    return info.factory(num_classes, in_channels, input_size)
