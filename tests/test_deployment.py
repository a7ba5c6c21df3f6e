"""The production compose file and the migrations, checked without Docker or a server."""

from pathlib import Path

import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from core.db.models import Base
from core.db.session import make_engine

REPO = Path(__file__).resolve().parents[1]


def test_compose_has_the_production_stack():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "flower"} <= set(services)
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["PEERAID_DATABASE_URL"].startswith("postgresql+psycopg://") and env["PEERAID_BROKER_URL"].startswith("redis://")
        assert "artifacts:/data" in services[name]["volumes"]  # one volume shared by the API and the workers
    for name in ("api", "redis", "postgres"):
        assert "healthcheck" in services[name]
    flower = services["flower"]
    assert any(arg.startswith("--basic-auth=") for arg in flower["command"]), "the queue monitor is not open to anyone"
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])
    assert "PEERAID_OPERATOR_TOKEN" in services["api"]["environment"]  # /metrics needs it


def test_more_gpu_workers_each_pin_their_own_gpu():
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["worker"]
    extra = yaml.safe_load((REPO / "docker-compose.gpus.yml").read_text())["services"]
    pinned = [base["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]]
    for service in extra.values():
        assert service["extends"] == {"file": "docker-compose.yml", "service": "worker"}
        pinned.append(service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
    assert sorted(map(tuple, pinned)) == [("0",), ("1",), ("2",), ("3",)]


def test_every_setting_is_documented_in_the_readme():
    from core.settings import Settings

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
