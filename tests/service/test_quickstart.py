"""The README's main job: `peeraid-service serve` brings up the embedded service in one command (API + worker),
and `peeraid-service demo` robustifies a model through the REST API and checks the downloaded weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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
            env={k: v for k, v in env.items() if k != "PEERAID_API_PORT"},  # `make demo` in another terminal: no port given
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


def test_demo_finds_the_server_on_the_port_it_was_started_on(tmp_path):
    """`PEERAID_API_PORT=8123 make run`, then `make demo` in another terminal, which knows nothing of the port."""
    port = free_port()
    env = {**os.environ, "PEERAID_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    for key in ("PEERAID_DATABASE_URL", "PEERAID_BROKER_URL", "PEERAID_API_PORT", "PEERAID_PUBLIC_URL", "PEERAID_API_KEY"):
        env.pop(key, None)
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--no-worker"],
        cwd=REPO,
        env={**env, "PEERAID_API_PORT": str(port)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    demo = None
    try:
        wait_until(lambda: _up(port) or serve.poll() is not None, 90, "the service")
        assert (tmp_path / "api_url").read_text().strip() == f"http://127.0.0.1:{port}"
        demo = subprocess.Popen(
            [sys.executable, "-m", "service", "demo", "--epochs", "1"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(demo.stdout.readline() for _ in range(2)), daemon=True)
        reader.start()
        reader.join(120)  # no worker: the job stays queued, and the demo waits for it once it has said where it is
        assert (
            lines
            and lines[0].strip() == f"PeerAiD service at http://127.0.0.1:{port} (the URL the running server wrote to {tmp_path}/api_url)"
        ), lines
        assert lines[1].startswith("submitted job job_"), lines
    finally:
        if demo is not None and demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    assert not (tmp_path / "api_url").exists(), "a stopped server leaves no URL behind"
