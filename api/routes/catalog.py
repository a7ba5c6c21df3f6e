"""What can be asked for: architectures and presets."""

from __future__ import annotations

from fastapi import APIRouter, Request

from core.engine.spec import PRESETS

from .. import cpu_worker
from ..deps import CpuWorkDep, TenantDep
from ..errors import responses
from ..schemas import ArchitectureOut, PresetOut

router = APIRouter(prefix="/v1", tags=["catalog"], responses=responses(401, 503))
_architectures: list[ArchitectureOut] = []  # measured once per process (by a dry forward), in a CPU worker


@router.get("/architectures", response_model=list[ArchitectureOut], summary="Student and peer architectures", responses=responses(429))
async def catalog_architectures(request: Request, tenant: TenantDep, cpu_work: CpuWorkDep) -> list[ArchitectureOut]:
    if not _architectures:
        measured = await cpu_work.run(request, tenant.id, lambda offload: offload(cpu_worker.architectures))
        _architectures[:] = [ArchitectureOut(**m) for m in measured]
    return _architectures


@router.get("/presets", response_model=list[PresetOut], summary="Named job specs (the paper's settings and a CPU demo)")
def catalog_presets(_tenant: TenantDep) -> list[PresetOut]:
    return [PresetOut(name=name, description=description, spec=spec) for name, (description, spec) in PRESETS.items()]
