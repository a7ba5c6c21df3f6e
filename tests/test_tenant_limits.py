"""The limits that apply to a tenant: its own where the operator set them, the deployment's elsewhere."""

from __future__ import annotations

from core.db.models import Tenant
from core.db.tenants import Limits, effective_limits
from core.settings import Settings


def test_a_tenants_own_limits_win_and_the_rest_are_the_deployments():
    settings = Settings(tenant_max_concurrent_jobs=4, max_upload_bytes=1000, tenant_max_storage_bytes=5000, max_job_hours=168.0)
    assert effective_limits(Tenant(name="default"), settings) == Limits(4, 1000, 5000, 168.0)
    own = Tenant(name="own", max_concurrent_jobs=1, max_upload_bytes=10, max_storage_bytes=None, max_job_hours=0.5)
    assert effective_limits(own, settings) == Limits(1, 10, 5000, 0.5)
