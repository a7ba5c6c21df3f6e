"""The ML engine: PeerAiD and baseline adversarial training, attacks, evaluation and export.

Imports torch (plus torchvision, safetensors, pydantic, and pyautoattack when AutoAttack runs)
and nothing of the service: the API, the workers, the benchmarks and notebooks share it.

    from core.engine import build_spec, load_splits, run_job
    spec = build_spec("digits-demo", {"epochs": 5})
    result = run_job(spec, load_splits(spec.dataset, val_fraction=spec.val_fraction), "runs/demo")

The names below are imported when first asked for (PEP 562), so importing a torch-free part of the
engine (the spec, the estimates, the report's keys, the built-in datasets' descriptions, core.engine.dataset_files
for validating an upload) imports no torch, so the API process never does.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peeraid_models import create_model, list_models

    from .errors import EngineError
    from .export import load_model
    from .pipeline import run_job
    from .sources import load_splits
    from .spec import PRESETS, JobSpec, build_spec

# name → the module it comes from
_EXPORTS = {
    "PRESETS": ".spec",
    "EngineError": ".errors",
    "JobSpec": ".spec",
    "build_spec": ".spec",
    "create_model": "peeraid_models",
    "list_models": "peeraid_models",
    "load_model": ".export",
    "load_splits": ".sources",
    "run_job": ".pipeline",
}

__all__ = ["PRESETS", "EngineError", "JobSpec", "build_spec", "create_model", "list_models", "load_model", "load_splits", "run_job"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # asked for once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
