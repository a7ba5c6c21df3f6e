"""The ML engine: PeerAiD and baseline adversarial training, attacks, evaluation and export.

Imports torch (plus torchvision, safetensors, pydantic, and pyautoattack when AutoAttack runs)
and nothing of the service: the API, the workers, the benchmarks and notebooks share it.

    from core.engine import build_spec, load_splits, run_job
    spec = build_spec("digits-demo", {"epochs": 5})
    result = run_job(spec, load_splits(spec.dataset, val_fraction=spec.val_fraction), "runs/demo")

The names below load on first use: importing a torch-free module of the engine (the spec, the estimates, the
report's keys, the built-in datasets' descriptions) does not load torch, so the API process never does.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PRESETS": ".spec",
    "JobSpec": ".spec",
    "build_spec": ".spec",
    "EngineError": ".errors",
    "load_model": ".export",
    "run_job": ".job",
    "load_splits": ".sources",
    "create_model": "peeraid_models",
    "list_models": "peeraid_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module, __name__ if module.startswith(".") else None), name)
