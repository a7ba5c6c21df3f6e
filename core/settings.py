"""All service configuration, from environment variables prefixed PEERAID_ (or a .env file).

Defaults give the embedded deployment: SQLite, Celery on kombu's SQLAlchemy transport over
SQLite, artifacts on local disk under ./var, so one command starts a working service on a bare
machine. Production sets PEERAID_DATABASE_URL (PostgreSQL), PEERAID_BROKER_URL (Redis) and
PEERAID_DATA_DIR (a volume shared by the API and every worker)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PEERAID_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="root of the database (SQLite), broker (SQLite), uploads, checkpoints and artifacts")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir")
    broker_url: str | None = Field(None, description="Celery broker; default: kombu's SQLAlchemy transport on SQLite in data_dir")
    task_queue: str = Field("peeraid-jobs", description="Celery queue the GPU workers consume")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(
        1, ge=1, le=64, description="API processes (uvicorn workers); per-tenant stream and upload slots are per process"
    )
    public_url: str | None = Field(None, description="base URL users reach the API at (for links); default http://api_host:api_port")

    max_upload_bytes: int = Field(2 * 1024**3, description="largest dataset upload, per file")
    tenant_max_storage_bytes: int = Field(50 * 1024**3, description="default per-tenant total of uploaded datasets (413 above it)")
    sweep_interval: float = Field(600.0, description="seconds between the API's sweeps of files no row points at")
    upload_idle_timeout: float = Field(60.0, description="an upload that sends nothing for this long is dropped (408)")
    sse_keep_alive_seconds: float = Field(
        15.0, gt=0, description="an event stream sends a keep-alive comment this often, whatever its job does (proxies cut silent ones)"
    )
    estimate_device: str = Field(
        "auto",
        description="device class of the workers, which job estimates are made for: h100, cpu, or auto (from "
        "worker_device: cpu, or a CUDA device as h100; with that on auto too, whether this host has an NVIDIA GPU)",
    )
    max_job_hours: float = Field(
        168.0, description="default per-tenant limit on a job's estimated hours on the estimate device (422 above it)"
    )
    max_job_memory_bytes: int = Field(64 * 1024**3, description="largest estimated memory of a job at its batch size (422 above it)")
    max_input_side: int = Field(256, description="largest image side a job may train on (422 above it; resize at upload)")
    max_evaluation_passes: int = Field(50_000_000, description="most forward passes the final report may make per model (422 above it)")
    max_json_bytes: int = Field(
        256 * 1024,
        description="largest request body of any content type, dataset uploads excepted: 413 above it, before the key is "
        "checked (a declared Content-Length at once, unread; a chunked body cut there)",
    )
    tenant_max_concurrent_jobs: int = Field(4, description="default per-tenant limit on queued + running jobs")
    key_max_in_flight: int = Field(
        32,
        ge=1,
        description="requests in flight per API key (however its Authorization header is spelled, its web sessions "
        "included), per API process, open event streams included (429 above)",
    )
    session_max_in_flight: int = Field(
        6,
        ge=1,
        description="requests in flight from one API key's web UI sessions together, per API process (429 above; "
        "they count in the key's limit too): a browser opens at most six connections to a site",
    )
    address_max_in_flight: int = Field(
        16,
        ge=1,
        description="requests in flight per client address without a valid API key or web session (unknown keys "
        "being looked up included; /healthz excepted), per API process (429 above)",
    )
    tenant_max_cpu_work: int = Field(
        2,
        ge=1,
        description="CPU-heavy requests (job pre-flights, submissions, training-curve images) one tenant may have "
        "running at once, per API process (429 above); one whose client leaves is stopped",
    )
    refusal_delay_seconds: float = Field(
        0.5,
        ge=0,
        description="every 429 answer (a per-key, per-address or per-tenant limit) is held back this long before it is "
        "sent, so that a client retrying at once cannot spin on refusals; its Retry-After says when to come back",
    )
    cpu_workers: int = Field(
        2,
        ge=1,
        description="worker processes that run CPU-heavy requests' arithmetic (pre-flights, curve images), per API process, "
        "for all tenants together (more wait their turn); forked on first use, sharing torch's pages",
    )
    tenant_max_streams: int = Field(10, description="event streams one tenant may hold open at once, per API process (429 above)")
    tenant_max_uploads: int = Field(2, description="uploads one tenant may send at once, per API process (429 above)")
    max_parallel_validations: int = Field(2, description="uploads validated at once per API process; others wait their turn")
    dataset_data_root: Path | None = Field(None, description="where CIFAR/TinyImageNet live or are downloaded; default data_dir/builtin")
    allow_downloads: bool = Field(True, description="let workers download CIFAR through torchvision")

    worker_device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")
    worker_threads: int | None = Field(
        None, ge=1, description="CPU threads a job may use (default: PyTorch's, one per core); on a shared CPU host 1 is often far faster"
    )
    heartbeat_interval: float = Field(5.0, description="seconds between a running job's heartbeats")
    heartbeat_timeout: float = Field(60.0, description="a running job without a heartbeat for this long is re-queued")
    requeue_after: float = Field(300.0, description="a queued job untouched this long has its message sent again")
    reconcile_interval: float = Field(15.0, description="seconds between reconciler passes in each worker")
    max_attempts: int = Field(3, description="deliveries of a job before it fails for good")
    progress_interval: float = Field(2.0, description="seconds between progress writes of a running job")
    max_job_seconds: float = Field(
        7 * 24 * 3600,
        description="longest a job may run (from its first start; it then fails, keeping its last checkpoint's "
        "student); also sets the broker's visibility timeout",
    )
    worker_max_memory_bytes: int | None = Field(
        None,
        description="memory a job's process may use (it then fails, keeping its last checkpoint's student); "
        "default: 80% of the host's memory",
    )

    auth_cache_seconds: float = Field(5.0, description="how long a valid API key is remembered; a revoked key stops working within this")
    operator_token: str | None = Field(None, description="bearer token for /metrics and /readyz's details (cross-tenant counts, hosts)")

    log_level: str = "INFO"
    log_json: bool = Field(False, description="structured JSON logs")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'peeraid.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def resolved_public_url(self) -> str:
        return self.public_url or f"http://{self.api_host}:{self.api_port}"

    @property
    def builtin_data_root(self) -> Path:
        return self.dataset_data_root or self.data_dir / "builtin"


@lru_cache
def get_settings() -> Settings:
    return Settings()
