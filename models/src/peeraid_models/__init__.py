"""The PeerAiD service's image classifiers, and its weights files read with PyTorch alone.

from peeraid_models import load_model
model, meta = load_model("student.safetensors")  # eval mode; meta["classes"] names the outputs

from peeraid_models import create_model, list_models
model = create_model("resnet18", num_classes=10)  # timm-style registry
"""

from . import mobilenetv2, preact_resnet, resnet, small_cnn, wide_resnet  # noqa: F401  (registration)
from .errors import ArchitectureError, InputTooSmallError, UnknownArchitectureError, WeightsError
from .registry import ArchitectureInfo, create_model, get_model_info, list_models, register_model
from .weights import WEIGHTS_FORMAT, load_model, read_weights

__all__ = [
    "WEIGHTS_FORMAT",
    "ArchitectureError",
    "ArchitectureInfo",
    "InputTooSmallError",
    "UnknownArchitectureError",
    "WeightsError",
    "create_model",
    "get_model_info",
    "list_models",
    "load_model",
    "read_weights",
    "register_model",
]
