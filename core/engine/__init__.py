"""The ML engine: PeerAiD and baseline adversarial training, attacks, evaluation and export.

Imports torch (plus torchvision, safetensors, pydantic, and pyautoattack when AutoAttack runs)
and nothing of the service: the API, the workers, the benchmarks and notebooks share it.

    from core.engine import build_spec, load_splits, run_job
    spec = build_spec("digits-demo", {"epochs": 5})
    result = run_job(spec, load_splits(spec.dataset, val_fraction=spec.val_fraction), "runs/demo")
"""

from peeraid_models import create_model, list_models

from .errors import EngineError
from .export import load_model
from .job import run_job
from .sources import load_splits
from .spec import PRESETS, JobSpec, build_spec

__all__ = ["PRESETS", "EngineError", "JobSpec", "build_spec", "create_model", "list_models", "load_model", "load_splits", "run_job"]
