"""The SDK and the CLI against the real service stacks of tests/service (API + Celery worker, embedded
SQLite and PostgreSQL + Redis): one tenant and one finished job per stack, shared by the tests."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from peeraid_client import Client  # installed by `make install` (pip install -e ./client)
from tests.stack import FAST_JOB, Stack, free_port  # noqa: F401  (re-exported for the client tests)


@pytest.fixture(scope="session")
def api_key(stack: Stack) -> str:
    return stack.admin("create-key", f"client-{secrets.token_hex(4)}")


@pytest.fixture(scope="session")
def sdk(stack: Stack, api_key: str):
    with Client(stack.url, api_key, retries=2, backoff=0.1) as client:
        yield client


@pytest.fixture(scope="session")
def digits_file(tmp_path_factory, digits_npz_bytes: bytes) -> Path:
    path = tmp_path_factory.mktemp("upload") / "my digits (v1).npz"  # a name the service would refuse as is
    path.write_bytes(digits_npz_bytes)
    return path


@pytest.fixture(scope="session")
def finished_job(sdk: Client, digits_file: Path) -> tuple[dict, dict]:
    """Upload → submit → wait, through the SDK: (dataset, succeeded job)."""
    dataset = sdk.upload_dataset(digits_file, name="sdk-digits")
    job = sdk.submit_job(preset="digits-demo", dataset=dataset["id"], spec=FAST_JOB)
    done = sdk.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", done["error"]
    return dataset, done


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no service settings, an empty home (no config file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERAID_") and k != "XDG_CONFIG_HOME"}
    return {**env, **extra}


def run_cli(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peeraid_client.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
