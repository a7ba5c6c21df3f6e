"""The shape of the code, checked: no import circles between the project's modules, and each layer
imports only what it may (the engine: torch and friends, never the web, queue or database layers;
the client: httpx, never the service)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "core", "worker", "service", "bench")
# the worker modules the API may not import: it sends messages (worker.queue, worker.celery_app), nothing else
WORKER_ONLY = ("main", "tasks", "runner", "lease", "callbacks", "signals", "reconciler")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules a file imports at module level or in functions, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def project_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_circles():
    graph = project_graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                cycles.append([*stack[stack.index(neighbour) :], neighbour])
            elif neighbour not in state:
                visit(neighbour, [*stack, neighbour])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ re-exporting its own modules is not a circle between modules
    real = [c for c in cycles if not any(m == n.rsplit(".", 1)[0] for m, n in itertools.pairwise(c))]
    assert not real, "import circles: " + "; ".join(" → ".join(c) for c in real)


def test_each_layer_imports_only_what_it_may():
    forbidden = {
        "core.engine": ("fastapi", "starlette", "celery", "kombu", "sqlalchemy", "api", "worker", "service", "core.db"),
        "core.db": ("fastapi", "starlette", "celery", "api", "worker", "service"),
        "worker": ("fastapi", "starlette", "api", "service"),
        "api": ("service", "torch", "pyautoattack", "peeraid_models", *(f"worker.{m}" for m in WORKER_ONLY)),
    }
    for path in [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]:
        name = module_name(path)
        for layer, banned in forbidden.items():
            if name == layer or name.startswith(layer + "."):
                if name == "api.cpu_worker":  # runs in the CPU worker processes, where it imports the engine in its functions
                    banned = tuple(b for b in banned if b not in ("torch", "peeraid_models"))
                bad = [m for m in imports_of(path) if any(m == b or m.startswith(b + ".") for b in banned)]
                assert not bad, f"{name} imports {bad}"
    client = REPO / "client" / "src" / "peeraid_client"
    for path in client.rglob("*.py"):
        bad = [m for m in imports_of(path) if m.split(".")[0] in ("core", "api", "worker", "service", "torch", "fastapi")]
        assert not bad, f"{path.name} imports {bad}"


API_PROCESS = """
import sys, warnings
from celery._state import _apps
from api.main import create_app
from core.db import tenants
from core.db.session import database
from core.settings import Settings
from service.cli import migrate
apps_at_import = len(list(_apps))
settings = Settings(data_dir=sys.argv[1], worker_device="cpu")
migrate(settings)
with database(settings.resolved_database_url).transaction() as session:
    key = tenants.create_api_key(session, tenants.get_or_create_tenant(session, "t"))[1]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as client:
    answers = [
        client.get("/healthz").status_code,
        client.get("/v1/presets").status_code,
        client.get("/v1/architectures").status_code,
        client.post("/v1/jobs/preflight", json={"preset": "digits-demo"}).status_code,
        client.post("/v1/jobs", json={"preset": "digits-demo", "spec": {"student": "resnet9000"}}).status_code,
        client.post("/v1/jobs", json={"preset": "digits-demo", "spec": {"epochs": 1, "lr_decay_epochs": []}}).status_code,
        client.get("/v1/jobs").status_code,
    ]
heavy = sorted(m for m in ("torch", "pyautoattack", "matplotlib", "peeraid_models", "worker.main", "worker.tasks") if m in sys.modules)
print(apps_at_import, answers, heavy)
"""


def test_the_api_process_loads_neither_torch_nor_pyautoattack(tmp_path):
    """The API's CPU-heavy work (pre-flights, the architecture catalog, curve images) runs in its CPU workers, which
    import the engine; the API process itself serves catalogs, pre-flights and submissions without loading torch,
    and builds its Celery app in create_app, not at import."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", API_PROCESS, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "0 [200, 200, 200, 200, 422, 201, 200] []", out.stdout
