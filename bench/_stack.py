"""What the load tools run against, on this machine only: a throwaway PostgreSQL database, the
service's API (`python -m service api`) and the naive baseline (`python -m bench.naive_app`) as
processes, API keys and job rows. Everything is removed again on exit, Ctrl-C included.

The first part (up to Server) is also how the tests (tests/stack.py) start the service's API and worker
processes against throwaway databases: the servers, the database names and the timeouts are the caller's."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("PEERAID_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PEERAID_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlalchemy_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def services_problem(admin_url: str = PG_ADMIN_URL, redis_url: str | None = None) -> str | None:
    """Why PostgreSQL (and Redis, if given) cannot be used here, or None. Only a server that does not
    answer is such a reason: a malformed URL raises."""
    import psycopg
    import redis

    try:
        with psycopg.connect(admin_url, connect_timeout=3):
            pass
    except psycopg.OperationalError as err:
        return f"PostgreSQL not reachable at {admin_url}: {err}"
    if redis_url is not None:
        try:
            redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
        except (redis.ConnectionError, redis.TimeoutError) as err:
            return f"Redis not reachable at {redis_url}: {err}"
    return None


@contextmanager
def throwaway_database(admin_url: str = PG_ADMIN_URL, prefix: str = "peeraid_bench") -> Iterator[tuple[str, str]]:
    """A new, empty database `{prefix}_*` for one run: (its name, its SQLAlchemy URL); dropped, connections and all, on exit."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, sqlalchemy_url(f"{admin_url.rsplit('/', 1)[0]}/{name}")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def spawn(module: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m module args` from the repository, its output appended to `log`, in its own process group
    (start_new_session), so that stopping it reaches its children too (uvicorn's, the Celery pool's)."""
    with open(log, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_service(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """One administrative command, `python -m service args` (migrate, create-key, ...), its output captured."""
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def log_tail(log: Path, chars: int) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def wait_until_up(name: str, process: subprocess.Popen, url: str, log: Path, timeout: float, interval: float = 0.2) -> None:
    """Until GET {url}/healthz answers 200; RuntimeError, with the end of its log, if it exits or is not up in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_tail(log, 3000)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{name} not up on {url} after {timeout:.0f}s:\n{log_tail(log, 3000)}")


def stop(process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM to its process group; SIGKILL if it has not exited `timeout` seconds later."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def service_env(database_url: str, data_dir: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PEERAID_DATABASE_URL": database_url,
        "PEERAID_BROKER_URL": REDIS_URL,
        "PEERAID_TASK_QUEUE": f"peeraid-bench-{secrets.token_hex(4)}",  # no worker reads it: submitted jobs stay queued
        "PEERAID_DATA_DIR": str(data_dir),
        "PEERAID_API_HOST": "127.0.0.1",
        "PEERAID_API_PORT": str(port),
    }


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_up(self, timeout: float = 60) -> None:
        wait_until_up(self.name, self.process, self.url, self.log, timeout)

    def stop(self) -> None:
        stop(self.process, timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log, chars)


def start_server(name: str, module: str, args: list[str], env: dict[str, str], log: Path) -> Server:
    """`python -m module args` (see spawn). Not waited for: call wait_until_up (after starting the others, so
    that they start side by side)."""
    return Server(name, spawn(module, args, env, log), f"http://{env['PEERAID_API_HOST']}:{env['PEERAID_API_PORT']}", log)


def create_key(env: dict[str, str], tenant: str) -> str:
    """A new API key for `tenant` (created if new), through the service's own command (which also migrates)."""
    out = run_service(["create-key", tenant], env)
    if out.returncode != 0:
        raise RuntimeError(f"create-key {tenant} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def submit_job(url: str, key: str) -> str:
    """A job submitted through the API (preset digits-demo); with no worker it stays queued."""
    response = httpx.post(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, json={"preset": "digits-demo"}, timeout=30)
    response.raise_for_status()
    return response.json()["id"]


def insert_jobs(database_url: str, like: str, count: int) -> list[str]:
    """`count` more queued jobs of the same tenant and spec as job `like`, written straight into the jobs table."""
    from sqlalchemy import create_engine, insert, select

    from core.db.models import Job

    engine = create_engine(database_url)
    try:
        with engine.begin() as db:
            model = db.execute(select(Job.tenant_id, Job.dataset_name, Job.preset, Job.spec).where(Job.id == like)).one()
            rows = [dict(model._mapping) for _ in range(count)]
            return list(db.scalars(insert(Job).returning(Job.id), rows)) if rows else []
    finally:
        engine.dispose()


def forget_queue(queue: str) -> None:
    """Drop the messages the API sent to a queue that no worker reads, and kombu's records of the
    queue (the name is this run's own, so every key naming it is)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
    try:
        keys = list(client.scan_iter(match=f"*{queue}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@dataclass
class LocalService:
    database_url: str
    api: Server
    keys: dict[str, str]  # tenant name: API key
    naive: Server | None = None
    tmp_dir: Path | None = None  # the API's TMPDIR, its own, inside the throwaway data directory


def start_local_service(stack: ExitStack, tenants: list[str], naive: bool = False) -> LocalService:
    """A throwaway database, the service's API on it (and the naive app), a key per tenant; all
    undone when `stack` closes: servers stopped, queued messages dropped, database dropped."""
    problem = services_problem()
    if problem:
        raise SystemExit(problem)
    _, database_url = stack.enter_context(throwaway_database())
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peeraid-bench-")))
    env = service_env(database_url, data_dir, free_port())
    stack.callback(forget_queue, env["PEERAID_TASK_QUEUE"])  # after the API has stopped: it may still send messages until then
    keys = {tenant: create_key(env, tenant) for tenant in tenants}  # the first also applies the migrations
    tmp_dir = data_dir / "tmp"
    tmp_dir.mkdir()
    api = start_server("service API", "service", ["api"], {**env, "TMPDIR": str(tmp_dir)}, data_dir / "api.log")
    stack.callback(api.stop)
    naive_app = None
    if naive:
        naive_app = start_server("naive app", "bench.naive_app", [], {**env, "PEERAID_API_PORT": str(free_port())}, data_dir / "naive.log")
        stack.callback(naive_app.stop)
        naive_app.wait_until_up()
    api.wait_until_up()
    return LocalService(database_url, api, keys, naive_app, tmp_dir)


def interrupt_on_ctrl_c_and_sigterm() -> None:
    """Ctrl-C and `kill` both raise KeyboardInterrupt, so either cleans up: servers stopped, database dropped.
    SIGINT too, explicitly: a process started in the background by a non-interactive shell (CI's, for one)
    inherits SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
