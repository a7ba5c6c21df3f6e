"""What can be asked for: architectures and presets."""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter
from peeraid_models import list_models

from core.engine.spec import PRESETS

from ..deps import TenantDep
from ..errors import responses
from ..schemas import ArchitectureOut, PresetOut

router = APIRouter(prefix="/v1", tags=["catalog"], responses=responses(401, 503))


@cache
def _architectures() -> list[ArchitectureOut]:
    return [
        ArchitectureOut(
            name=m.name, description=m.description, family=m.family, min_input_size=m.min_input_size, params_cifar10=m.num_params(10, 3)
        )
        for m in list_models()
    ]


@router.get("/architectures", response_model=list[ArchitectureOut], summary="Student and peer architectures")
def catalog_architectures(_tenant: TenantDep) -> list[ArchitectureOut]:
    return _architectures()


@router.get("/presets", response_model=list[PresetOut], summary="Named job specs (the paper's settings and a CPU demo)")
def catalog_presets(_tenant: TenantDep) -> list[PresetOut]:
    return [PresetOut(name=name, description=description, spec=spec) for name, (description, spec) in PRESETS.items()]
