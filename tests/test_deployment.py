"""The production compose files, the image and the migrations, checked without Docker or a server: what each
service runs exists and starts the component it is named for, every setting it is given is one the service reads
and accepts, the API and the workers share one database, broker, queue and storage, healthchecks ask questions the
components answer, and the volumes and services referred to are declared."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import tomllib
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from core.db.models import Base
from core.db.session import make_engine
from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpus.yml")
OPERATOR_SUPPLIED = "set-by-the-operator"  # what a required variable (${X:?message}) stands for here
COMPONENTS = ("api", "worker")  # the services that run the service's own code


def interpolate(value):
    """Compose's variable substitution, with none of the operator's variables set: ${X:-default} and ${X-default}
    give the default, a required ${X:?message} a value the operator supplies, ${X} and $X nothing, $$ a dollar."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        operator, argument = match.group(2), match.group(3)
        if operator in (":-", "-"):
            return argument
        return OPERATOR_SUPPLIED if operator in (":?", "?") else ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)", substitute, value)


def load(name: str) -> dict:
    return interpolate(yaml.safe_load((REPO / name).read_text()))


def merged(service: dict, files: dict[str, dict]) -> dict:
    """A service with what it `extends` filled in (top-level keys only: enough for what is checked here)."""
    extends = service.get("extends")
    if not extends:
        return service
    assert extends["file"] in files, f"extends a file that is not there: {extends}"
    base = files[extends["file"]]["services"]
    assert extends["service"] in base, f"extends a service {extends['file']} does not have: {extends}"
    return {**merged(base[extends["service"]], files), **{k: v for k, v in service.items() if k != "extends"}}


@pytest.fixture(scope="module")
def files() -> dict[str, dict]:
    return {name: load(name) for name in COMPOSE_FILES}


@pytest.fixture(scope="module")
def services(files) -> dict[str, dict]:
    """Every service of the full deployment (both files), with what it extends filled in."""
    found: dict[str, dict] = {}
    for compose in files.values():
        for name, service in compose["services"].items():
            found[name] = merged(service, files)
    return found


def components(services: dict[str, dict]) -> dict[str, dict]:
    """The services that run the service's image: the API and every worker."""
    found = {name: s for name, s in services.items() if s.get("image") == services["api"]["image"]}
    assert set(COMPONENTS) <= set(found), sorted(found)
    return found


def image_environment() -> dict[str, str]:
    """The variables the Dockerfile's ENV lines set: every container of the image starts with them."""
    lines = re.findall(r"^ENV (.+)$", (REPO / "Dockerfile").read_text(), re.M)
    return dict(pair.split("=", 1) for line in lines for pair in shlex.split(line))


def settings_of(service: dict, monkeypatch, image: bool = True) -> Settings:
    """The Settings the service's process reads from its environment, the image's and then the service's (and
    nothing else: no .env, none of ours)."""
    with monkeypatch.context() as environment:
        for name in [n for n in os.environ if n.startswith("PEERAID_")]:
            environment.delenv(name)
        for name, value in {**(image_environment() if image else {}), **service.get("environment", {})}.items():
            environment.setenv(name, str(value))
        return Settings(_env_file=None)


def mounts(service: dict) -> dict[str, str]:
    """A service's mounts: the path inside the container → the volume (or host path) there."""
    return {target: source for source, target, *_ in (str(volume).split(":") for volume in service.get("volumes", []))}


def entry_point(name: str):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert name in scripts, f"{name!r} is not a console script of pyproject.toml: {sorted(scripts)}"
    module, _, attribute = scripts[name].partition(":")
    return importlib.import_module(module), attribute


def dispatched(argv: list[str], monkeypatch) -> tuple[str, object]:
    """Which of the service's commands `argv` (a compose or Dockerfile command) reaches, and with what arguments:
    the console script's main, as installed, with every cmd_* function replaced by a recorder."""
    module, attribute = entry_point(argv[0])
    reached = []
    for name in [n for n in vars(module) if n.startswith("cmd_")]:
        monkeypatch.setattr(module, name, lambda args, settings, name=name: reached.append((name, args)) or 0)
    monkeypatch.setattr(module, "configure_logging", lambda settings: None)
    assert getattr(module, attribute)(argv[1:]) == 0
    assert len(reached) == 1, reached
    return reached[0]


def test_each_component_runs_the_command_it_is_named_for(services, monkeypatch):
    """The API container serves the API only (no embedded worker), each worker container runs one worker, and the
    image's default command is the API; through the console script pyproject.toml installs."""
    for name, service in components(services).items():
        expected = "cmd_api" if name == "api" else "cmd_worker"
        assert dispatched(service["command"], monkeypatch)[0] == expected, (name, service["command"])
    dockerfile_cmd = re.search(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    assert dockerfile_cmd and dispatched(yaml.safe_load(dockerfile_cmd.group(1)), monkeypatch)[0] == "cmd_api"


def test_the_worker_healthcheck_pings_the_worker_the_command_starts(services, monkeypatch):
    """`celery -A <app> inspect ping -d <node>`: the app is importable and a Celery app, and the node is the one the
    worker command names (peeraid-service worker --name N → N@%h, %h the host name)."""
    from celery import Celery

    from service.cli import worker_command

    for name, service in components(services).items():
        if name == "api":
            continue
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL", check
        argv = shlex.split(check[1].split("||")[0])
        assert argv[0] == "celery", argv
        app_module = argv[argv.index("-A") + 1]
        module = importlib.import_module(app_module)
        assert isinstance(getattr(module, "app", None) or getattr(module, "celery", None), Celery), app_module
        _, args = dispatched(service["command"], monkeypatch)
        started = worker_command(settings_of(service, monkeypatch), args.name)
        assert started[started.index("-A") + 1] == app_module, "the healthcheck asks another app than the worker runs"
        node = started[started.index("--hostname") + 1].replace("%h", "$HOSTNAME")
        assert argv[argv.index("-d") + 1] == node, f"{name}'s healthcheck pings a node its worker is not called"


def test_the_api_healthcheck_asks_a_route_that_answers_without_credentials(services, monkeypatch, tmp_path):
    """The URL in the API's healthcheck is on the port the API listens on, which is also the container port
    published and the one the image exposes; the path is a route that answers 200 with no key or token."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette announces its move to httpx2; the TestClient works as is
        from fastapi.testclient import TestClient

    from api.main import create_app

    api = services["api"]
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(api["healthcheck"]["test"]))
    assert len(urls) == 1, api["healthcheck"]
    url = urlsplit(urls[0])
    settings = settings_of(api, monkeypatch)
    assert url.hostname in ("127.0.0.1", "localhost") and settings.api_host in ("0.0.0.0", "::", "127.0.0.1"), settings.api_host
    assert url.port == settings.api_port
    assert {int(str(p).rsplit(":", 1)[1]) for p in api["ports"]} == {settings.api_port}, api["ports"]
    assert re.search(rf"^EXPOSE {settings.api_port}$", (REPO / "Dockerfile").read_text(), re.M), "the image exposes another port"
    embedded = settings_of({"environment": {"PEERAID_DATA_DIR": str(tmp_path)}}, monkeypatch, image=False)  # the same app on SQLite
    response = TestClient(create_app(embedded)).get(url.path)
    assert response.status_code == 200, (url.path, response.status_code, response.text)


def test_every_setting_given_is_one_the_service_reads_and_accepts(services, monkeypatch):
    """Settings ignores unknown PEERAID_ variables (extra="ignore"), so a misspelt one would silently change nothing."""
    for name, service in components(services).items():
        environment = service.get("environment", {})
        unknown = [v for v in environment if v.startswith("PEERAID_") and v.removeprefix("PEERAID_").lower() not in Settings.model_fields]
        assert not unknown, f"{name} sets variables Settings does not read: {unknown}"
        settings_of(service, monkeypatch)  # and each value parses (a pydantic ValidationError otherwise)


def test_the_api_and_the_workers_share_database_broker_queue_and_storage(services, monkeypatch):
    settings = {name: settings_of(service, monkeypatch) for name, service in components(services).items()}
    shared = {
        name: (s.resolved_database_url, s.resolved_broker_url, s.task_queue, s.data_dir, s.max_job_seconds) for name, s in settings.items()
    }
    assert len(set(shared.values())) == 1, shared
    volumes = {name: mounts(service).get(str(settings[name].data_dir)) for name, service in components(services).items()}
    assert None not in volumes.values(), f"a data_dir that is not a mounted volume: {volumes}"
    assert len(set(volumes.values())) == 1, f"the API serves artifacts from where the workers write them: {volumes}"


def test_the_api_is_given_the_operator_token(services, monkeypatch):
    """The compose file demands it (${X:?}): without it, Prometheus cannot read /metrics."""
    assert settings_of(services["api"], monkeypatch).operator_token == OPERATOR_SUPPLIED


def test_the_database_and_broker_urls_reach_the_compose_servers(services, monkeypatch):
    from sqlalchemy.engine import make_url

    settings = settings_of(services["api"], monkeypatch)
    database = make_url(settings.resolved_database_url)
    assert database.get_backend_name() == "postgresql", "the production database is PostgreSQL"
    assert database.host in services, f"the database host {database.host} is not a service of the deployment"
    postgres = services[database.host]["environment"]
    assert (database.username, database.password, database.database) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    ), "the API's database URL and the postgres service's credentials disagree"
    assert (database.port or 5432) == 5432
    broker = urlsplit(settings.resolved_broker_url)
    assert broker.scheme == "redis" and broker.hostname in services and "redis-server" in services[broker.hostname]["command"]
    flower = services["flower"]["command"]
    assert f"--broker={settings.resolved_broker_url}" in flower, "the queue monitor watches another broker"


def test_the_queue_monitor_is_not_open_to_anyone(services):
    flower = services["flower"]
    auth = [arg.split("=", 1)[1] for arg in flower["command"] if arg.startswith("--basic-auth=")]
    assert len(auth) == 1 and all(auth[0].split(":", 1)), f"no user and password: {flower['command']}"
    assert auth[0].split(":", 1)[1] == OPERATOR_SUPPLIED, "the password has a default anyone can read here"
    assert flower["ports"] and all(str(port).startswith("127.0.0.1:") for port in flower["ports"]), flower["ports"]


def test_volumes_and_dependencies_referred_to_are_declared(files, services):
    declared = set(files["docker-compose.yml"].get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source in mounts(service).values():
            if not source.startswith((".", "/", "~")):  # a named volume, not a host path
                assert source in declared, f"{name} mounts volume {source!r}, which is not declared"
                used.add(source)
        depends_on = service.get("depends_on") or {}
        for dependency, condition in (depends_on if isinstance(depends_on, dict) else {key: {} for key in depends_on}).items():
            assert dependency in services, f"{name} depends on {dependency!r}, which is not a service"
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency} to be healthy; it has no healthcheck"
    assert declared == used, f"declared but never mounted: {declared - used}"


def test_each_gpu_worker_pins_its_own_gpu_and_trains_on_it(services, monkeypatch):
    pinned = {}
    for name, service in components(services).items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name == "api":
            assert not devices, "the API host has no GPU"
            continue
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], (name, devices)
        assert len(devices[0]["device_ids"]) == 1, f"{name} is given several GPUs and trains one job at a time"
        pinned[name] = devices[0]["device_ids"][0]
        assert settings_of(service, monkeypatch).worker_device.startswith("cuda"), f"{name} is given a GPU it does not use"
    assert len(set(pinned.values())) == len(pinned) > 1, f"two workers share a GPU: {pinned}"


def test_the_image_holds_what_it_installs_and_runs():
    """Every package pyproject.toml installs, and the ./models it installs, are copied into the image; so are the
    files pyproject.toml names (the readme) and those the service reads at start-up (alembic.ini, the migrations)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = {part for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for part in line.split()[:-1]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists() and any(Path(p.name).match(pat) for pat in patterns)}
    assert packages, patterns
    installed = set(re.findall(r"pip install [^\n]*?\./(\w+)", dockerfile))
    needed = packages | installed | {project["project"]["readme"], "pyproject.toml", "alembic.ini", "migrations"}
    assert not needed - copied, f"the image does not copy {sorted(needed - copied)}"
    # migrate() finds alembic.ini and migrations/ beside the service's packages (service.cli.REPO_ROOT): installed as a
    # wheel they would be in site-packages, without them, and every container's first migration would fail
    assert re.search(r'pip install [^\n]*-e "?\.\[service\]', dockerfile), "the image must install the service editable, in /app"


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [f"PEERAID_{name.upper()}" for name in Settings.model_fields if f"PEERAID_{name.upper()}" not in readme]
    assert not missing, f"add these to the README's configuration table: {missing}"


def test_migrations_create_exactly_the_models_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = url
    command.upgrade(config, "head")
    engine = make_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations disagree; add a migration: {diff}"
    command.downgrade(config, "base")
