"""Registry of image classifiers: `create_model("resnet18", num_classes=10)`, `list_models()`."""

from . import mobilenetv2, preact_resnet, resnet, small_cnn, wide_resnet  # noqa: F401  (registration)
from .registry import (
    ArchitectureError,
    ArchitectureInfo,
    UnknownArchitectureError,
    create_model,
    get_model_info,
    list_models,
    register_model,
)

__all__ = [
    "ArchitectureError",
    "ArchitectureInfo",
    "UnknownArchitectureError",
    "create_model",
    "get_model_info",
    "list_models",
    "register_model",
]
