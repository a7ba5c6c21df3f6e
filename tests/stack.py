"""Real service stacks for the tests: the API (uvicorn) and a Celery worker as separate processes,
over the embedded default (SQLite + kombu's SQLAlchemy transport) or over PostgreSQL + Redis.

PostgreSQL and Redis are those of PEERAID_TEST_PG_URL (an administrative connection, which creates and
drops a throwaway database `peeraid_test_*` per stack; default postgresql://postgres@127.0.0.1:5432/postgres)
and PEERAID_TEST_REDIS_URL (default redis://127.0.0.1:6379/0; each stack's queue is its own, `peeraid-test-*`,
and nothing else is touched). Every test that uses either takes it from here, the load tools the tests start
included. Where they are missing, their tests skip and say why, unless REQUIRE_SERVICES=1 (as in CI), where
they fail.

How the processes are started, waited for and stopped, and the throwaway databases, are bench/_stack.py's,
shared with the load tools."""

from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench import _stack
from bench._stack import REPO, free_port  # noqa: F401  (REPO: re-exported for the tests)
from core.engine.sources import load_digits

PG_ADMIN_URL = os.environ.get("PEERAID_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PEERAID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_GROUP = "postgres-redis"  # the xdist group (and stack) of every test that uses the local PostgreSQL

UPLOAD_LIMIT = 5_000_000
FAST_JOB = {
    "epochs": 4,
    "lr_decay_epochs": [2, 3],
    "attack_steps": 2,
    "eval_pgd_steps": 2,
    "evaluation": {"n_examples": 20, "autoattack": False},
}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Stack:
    """One deployment: its settings (environment), an API process and a worker process."""

    def __init__(self, name: str, env: dict[str, str], data_dir: Path):
        self.name = name
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PEERAID_DATA_DIR": str(data_dir),
            "PEERAID_API_PORT": str(self.port),
            "PEERAID_HEARTBEAT_INTERVAL": "0.5",
            # well above the heartbeats' interval even on a loaded machine: at 4 s, a live worker whose heartbeat
            # thread was starved for a few seconds lost its job (a CI run saw five attempts where a kill makes two)
            "PEERAID_HEARTBEAT_TIMEOUT": "10",
            "PEERAID_RECONCILE_INTERVAL": "1",
            "PEERAID_REQUEUE_AFTER": "5",
            "PEERAID_PROGRESS_INTERVAL": "0.5",
            "PEERAID_WORKER_DEVICE": "cpu",
            "PEERAID_ALLOW_DOWNLOADS": "false",
            "PEERAID_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            "PEERAID_MAX_ATTEMPTS": "6",  # the random-kill test restarts a job several times
            # the race tests submit twenty jobs at once, which must meet in the database: the per-tenant limit on
            # CPU-heavy requests (2, tested in process) would refuse eighteen of them before they race
            "PEERAID_TENANT_MAX_CPU_WORK": "32",
            "OMP_NUM_THREADS": "1",  # the worker shares two cores with pytest and the API
            **env,
        }
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], log_name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        return _stack.spawn("service", args, {**self.env, **(extra_env or {})}, self.logs / log_name)

    def admin(self, *args: str) -> str:
        out = _stack.run_service(list(args), self.env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def start_api(self) -> None:
        self.api = self._spawn(["api"], "api.log")
        _stack.wait_until_up(f"the {self.name} API", self.api, self.url, self.logs / "api.log", timeout=60, interval=0.25)

    def start_worker(self, extra_env: dict[str, str] | None = None) -> None:
        """extra_env: e.g. {"PEERAID_FAULTS": "write:checkpoint.safetensors:kill@3"} (core/engine/faults.py)."""
        self.worker = self._spawn(["worker", "--name", f"test-{secrets.token_hex(3)}"], "worker.log", extra_env)

    def kill_api(self) -> None:
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait(timeout=60)

    def kill_worker(self, sig: int = signal.SIGKILL) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, sig)
            self.worker.wait(timeout=60)
        self.worker = None

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            _stack.stop(proc, timeout=20)

    def log_tail(self, name: str, chars: int = 4000) -> str:
        return _stack.log_tail(self.logs / name, chars)

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def new_tenant(self, name: str | None = None) -> httpx.Client:
        return self.client(self.admin("create-key", name or f"tenant-{secrets.token_hex(4)}"))

    def wait_for_job(self, client: httpx.Client, job_id: str, statuses, timeout: float = 240) -> dict:
        statuses = {statuses} if isinstance(statuses, str) else set(statuses)

        def reached():
            try:
                response = client.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError:  # the API restarting
                return None
            job = response.json() if response.status_code == 200 else {}
            return job if job.get("status") in statuses else None

        try:
            return wait_until(reached, timeout, f"job {job_id} to reach {statuses}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- worker log ---\n{self.log_tail('worker.log')}") from None


def _postgres_available() -> str | None:
    """Why the tests' PostgreSQL or Redis cannot be reached, or None. Only a server that does not answer is a
    reason to skip: a missing driver or a URL that is not one fails the test instead."""
    return _stack.services_problem(PG_ADMIN_URL, REDIS_URL)


def require_services(problem: str | None) -> None:
    """Skip a test whose servers are missing, and say why; with REQUIRE_SERVICES=1 (as in CI), fail it."""
    if problem:
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail(f"REQUIRE_SERVICES=1 but {problem}")
        pytest.skip(problem)


def throwaway_database() -> AbstractContextManager[tuple[str, str]]:
    """A new database `peeraid_test_*` on the tests' PostgreSQL: (its name, its SQLAlchemy URL); dropped,
    connections and all, on exit."""
    return _stack.throwaway_database(PG_ADMIN_URL, prefix="peeraid_test")


@pytest.fixture(scope="session", params=["embedded", POSTGRES_GROUP])
def stack(request, tmp_path_factory):
    name = request.param
    data_dir = tmp_path_factory.mktemp(name)
    env: dict[str, str] = {}
    with ExitStack() as cleanup:
        if name == POSTGRES_GROUP:
            require_services(_postgres_available())
            _, database_url = cleanup.enter_context(throwaway_database())
            env = {
                "PEERAID_DATABASE_URL": database_url,
                "PEERAID_BROKER_URL": REDIS_URL,
                "PEERAID_TASK_QUEUE": f"peeraid-test-{secrets.token_hex(4)}",
            }
        deployment = Stack(name, env, data_dir)
        cleanup.callback(deployment.stop)  # before the database is dropped
        deployment.admin("migrate")
        deployment.start_api()
        deployment.start_worker()
        yield deployment


@pytest.fixture(scope="session")
def digits_npz_bytes() -> bytes:
    """The built-in digits as a user would upload them: an .npz of uint8 N×H×W×C arrays."""
    train, test = load_digits()
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        x_train=train.images.permute(0, 2, 3, 1).numpy(),
        y_train=train.labels.numpy(),
        x_test=test.images.permute(0, 2, 3, 1).numpy(),
        y_test=test.labels.numpy(),
    )
    return buffer.getvalue()
