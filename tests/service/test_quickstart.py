"""The README's main job: `peeraid-service serve` brings up the embedded service in one command (API + worker),
and `peeraid-service demo` robustifies a model through the REST API and checks the downloaded weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.stack import REPO, free_port, wait_until

pytestmark = pytest.mark.slow


def test_serve_then_demo(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PEERAID_DATA_DIR": str(tmp_path),
        "PEERAID_API_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PEERAID_WORKER_DEVICE": "cpu",
    }
    for key in ("PEERAID_DATABASE_URL", "PEERAID_BROKER_URL"):
        env.pop(key, None)  # the embedded default
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_until(lambda: _up(port) or serve.poll() is not None, 90, "the service")
        banner = (tmp_path / "serve.log").read_text()
        key = (tmp_path / "api_key").read_text().strip()
        assert f"http://127.0.0.1:{port}/docs" in banner and key in banner

        demo = subprocess.run(
            [sys.executable, "-m", "service", "demo", "--epochs", "3"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        assert "succeeded" in demo.stdout and "reproduced" in demo.stdout and "AutoAttack" in demo.stdout
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    # stopping the service stops its embedded worker too (no orphaned Celery processes)
    wait_until(lambda: not _processes_with(str(tmp_path)), 30, "the embedded worker to exit")


def _processes_with(text: str) -> list[int]:
    """Pids whose environment mentions `text` (the test's own data dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
