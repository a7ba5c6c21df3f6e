"""`peeraid-service`: run and administer the service.

peeraid-service serve            migrations, the API and an embedded worker: a working service in one command
peeraid-service api | worker     one component (docker-compose runs them separately)
peeraid-service migrate          apply database migrations
peeraid-service create-key TENANT [--name N]   print a new API key for TENANT (created if new)
peeraid-service revoke-key PREFIX              revoke a key (the part after pk_, before the next _)
peeraid-service list-keys
peeraid-service set-limits TENANT [--max-concurrent-jobs N] [--max-upload-bytes B] [--max-storage-bytes B]
peeraid-service reconcile        one reconciler pass (re-send lost messages, re-queue lost workers)
peeraid-service sweep            remove interrupted uploads and files no database row points at
peeraid-service demo             submit a job on the offline dataset through the REST API and check the result
                                 (to the server whose URL `serve`/`api` wrote to data_dir/api_url, unless told)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.db import tenants
from core.db.session import database
from core.settings import Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
URL_FILE = "api_url"  # in the data dir, while an API serves: the URL a client on this host reaches it at
log = logging.getLogger("peeraid")


def configure_logging(settings: Settings) -> None:
    from core.logs import configure

    configure(settings.log_level, settings.log_json)


def migrate(settings: Settings) -> None:
    from alembic import command
    from alembic.config import Config

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.attributes["database_url"] = settings.resolved_database_url
    command.upgrade(config, "head")


def ensure_local_key(settings: Settings) -> str:
    """The embedded deployment's key for tenant 'default', kept in data_dir/api_key (mode 0600)."""
    key_file = settings.data_dir / "api_key"
    with database(settings.resolved_database_url).transaction() as session:
        if key_file.exists():
            key = key_file.read_text().strip()
            if tenants.authenticate(session, key) is not None:
                return key
            log.warning("the key in %s is no longer valid (revoked?); creating a new one", key_file)
        _, key = tenants.create_api_key(session, tenants.get_or_create_tenant(session, "default"), name="local")
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def worker_command(settings: Settings, name: str = "worker") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.main",
        "worker",
        "--queues",
        settings.task_queue,
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "--loglevel",
        settings.log_level,
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def client_url(settings: Settings) -> str:
    """Where a client on this host reaches the API: the public URL, or the address it listens on (a wildcard
    address on loopback)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = "127.0.0.1" if settings.api_host in ("", "0.0.0.0") else "::1" if settings.api_host == "::" else settings.api_host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.api_port}"


@contextlib.contextmanager
def announced(settings: Settings) -> Iterator[None]:
    """While the API serves, data_dir/api_url holds its URL: `make demo` finds a server started on another port."""
    path, url = settings.data_dir / URL_FILE, client_url(settings)
    path.write_text(url + "\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == url:  # not another server's, started since on the same data dir
                path.unlink()


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings)
    return 0


def run_api(settings: Settings) -> None:
    import uvicorn

    options: dict[str, Any] = dict(host=settings.api_host, port=settings.api_port, log_config=None, proxy_headers=True)
    with announced(settings):
        if settings.api_workers > 1:  # several processes, each building the app from the environment's settings
            uvicorn.run("api.main:create_app", factory=True, workers=settings.api_workers, **options)
            return
        from api.main import create_app

        uvicorn.run(create_app(settings), **options)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings)
    key = ensure_local_key(settings)
    worker = None
    if not args.no_worker:
        # the embedded worker shares the cores with the API: one thread, where PyTorch's default of one per core is many
        # times slower (the README's PEERAID_WORKER_THREADS)
        env = {"PEERAID_WORKER_THREADS": "1", **os.environ}
        worker = subprocess.Popen(worker_command(settings, "embedded"), cwd=REPO_ROOT, env=env, start_new_session=True)
    url = settings.resolved_public_url
    banner = (
        f"\nPeerAiD service on {url}\n"
        f"  API docs   {url}/docs\n"
        f"  API key    {key}   (tenant 'default'; also in {settings.data_dir / 'api_key'})\n"
        f"  database   {settings.resolved_database_url}\n"
        f"  broker     {settings.resolved_broker_url}\n"
        f"  worker     {'1 embedded worker, device ' + settings.worker_device if worker else 'none started here'}\n"
        f"Try it: in another terminal run `make demo`. Stop with Ctrl-C.\n"
    )
    print(banner, flush=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown; as SystemExit it still reaches the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_api(settings)
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings)
    run_api(settings)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings)
    os.execv(sys.executable, worker_command(settings, args.name))


def cmd_create_key(args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings)
    with database(settings.resolved_database_url).transaction() as session:
        tenant = tenants.get_or_create_tenant(session, args.tenant)
        row, key = tenants.create_api_key(session, tenant, name=args.name)
        print(key)
        print(f"tenant {tenant.name} ({tenant.id}), key prefix {row.prefix}: shown once, store it safely", file=sys.stderr)
    return 0


def cmd_revoke_key(args: argparse.Namespace, settings: Settings) -> int:
    with database(settings.resolved_database_url).transaction() as session:
        if not tenants.revoke_key(session, args.prefix):
            print(f"error: no key with prefix {args.prefix}", file=sys.stderr)
            return 1
    print(f"revoked key {args.prefix}")
    return 0


def cmd_list_keys(args: argparse.Namespace, settings: Settings) -> int:
    with database(settings.resolved_database_url).transaction() as session:
        for row in tenants.list_keys(session):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            print(f"{row.prefix}  {row.tenant.name:<20} {row.name:<16} created {row.created_at:%Y-%m-%d %H:%M}  {state}")
    return 0


def cmd_set_limits(args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings)
    with database(settings.resolved_database_url).transaction() as session:
        tenant = tenants.get_or_create_tenant(session, args.tenant)
        tenants.set_limits(
            session,
            tenant,
            max_concurrent_jobs=args.max_concurrent_jobs,
            max_upload_bytes=args.max_upload_bytes,
            max_storage_bytes=args.max_storage_bytes,
            max_job_hours=args.max_job_hours,
        )
        limits = tenants.effective_limits(tenant, settings)
        print(
            f"tenant {tenant.name}: max_concurrent_jobs={limits.concurrent_jobs}, max_upload_bytes={limits.upload_bytes}, "
            f"max_storage_bytes={limits.storage_bytes}, max_job_hours={limits.job_hours}"
        )
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from worker.queue import JobQueue
    from worker.reconciler import reconcile

    print(reconcile(settings, JobQueue.for_settings(settings)))
    return 0


def cmd_sweep(args: argparse.Namespace, settings: Settings) -> int:
    from core.storage import Storage
    from core.sweep import sweep_orphans

    print(
        sweep_orphans(
            database(settings.resolved_database_url),
            Storage(settings.data_dir),
            partial_after=args.older_than,
            orphan_after=args.older_than,
        )
    )
    return 0


def demo_target(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    """The service the demo talks to, and why that one: --url; the URL settings given here name; else the URL
    the running server wrote to its data dir (`make run` on another port); else the default."""
    if args.url:
        return args.url, "--url"
    explicit = sorted({"public_url", "api_host", "api_port"} & settings.model_fields_set)
    if explicit:
        return client_url(settings), "from " + ", ".join(f"PEERAID_{name.upper()}" for name in explicit)
    recorded = settings.data_dir / URL_FILE
    with contextlib.suppress(OSError):
        if url := recorded.read_text().strip():
            return url, f"the URL the running server wrote to {recorded}"
    return client_url(settings), f"the default: no running server wrote its URL to {recorded}"


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    key_file = settings.data_dir / "api_key"
    key = args.api_key or os.environ.get("PEERAID_API_KEY")
    if not key:
        try:
            key = key_file.read_text().strip()
        except OSError:
            print(
                f"error: no API key: pass --api-key, set PEERAID_API_KEY, or start the service (`make run` writes {key_file})",
                file=sys.stderr,
            )
            return 1
    url, where = demo_target(args, settings)
    return run_demo(url, key, epochs=args.epochs, where=where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peeraid-service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="migrations + API + an embedded worker")
    serve.add_argument("--no-worker", action="store_true", help="start the API only")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("api", help="migrations + the API").set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="migrations + one Celery worker (one job at a time)")
    worker.add_argument("--name", default="worker", help="worker name (host name is appended)")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    create = sub.add_parser("create-key", help="create an API key (and the tenant if new)")
    create.add_argument("tenant")
    create.add_argument("--name", default="", help="a label for the key")
    create.set_defaults(func=cmd_create_key)
    revoke = sub.add_parser("revoke-key", help="revoke an API key by its prefix")
    revoke.add_argument("prefix")
    revoke.set_defaults(func=cmd_revoke_key)
    sub.add_parser("list-keys", help="list API keys (prefixes only)").set_defaults(func=cmd_list_keys)
    limits = sub.add_parser("set-limits", help="per-tenant limits (default: the PEERAID_TENANT_* settings)")
    limits.add_argument("tenant")
    limits.add_argument("--max-concurrent-jobs", type=int, help="queued + running jobs at once (429 above)")
    limits.add_argument("--max-upload-bytes", type=int, help="largest dataset upload (413 above)")
    limits.add_argument("--max-storage-bytes", type=int, help="total size of the tenant's uploaded datasets (413 above)")
    limits.add_argument("--max-job-hours", type=float, help="a job's estimated hours on the estimate device (422 above)")
    limits.set_defaults(func=cmd_set_limits)
    sub.add_parser("reconcile", help="one reconciler pass").set_defaults(func=cmd_reconcile)
    sweep = sub.add_parser("sweep", help="remove interrupted uploads and other files no database row points at")
    sweep.add_argument(
        "--older-than",
        type=float,
        default=3600,
        help="only files untouched this many seconds (default 3600); uploads in progress are never removed",
    )
    sweep.set_defaults(func=cmd_sweep)
    demo = sub.add_parser("demo", help="robustify a model on the offline dataset through the REST API")
    demo.add_argument(
        "--url",
        help="service URL (default: PEERAID_PUBLIC_URL or PEERAID_API_HOST/PORT if set, else the URL the running server "
        "wrote to data_dir/api_url, else http://127.0.0.1:8000)",
    )
    demo.add_argument("--api-key", help="default: PEERAID_API_KEY or data_dir/api_key")
    demo.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (shorter demo)")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings)
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
