"""The web UI with a real server: training curves while a job trains, and a real headless Chromium,
driven over the DevTools protocol, signing in and showing a finished job."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.stack import FAST_JOB, wait_until

# The pages themselves are tested in process (tests/api/test_ui_pages.py); here, what needs a real server:
# curves of a job while it trains, and a real browser. One backend suffices: the UI does not touch the broker.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("stack", ["embedded"], indirect=True)]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_APT = "apt-get install -y chromium"


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def finished(stack):
    """A tenant's key and client, and a job of theirs that succeeded."""
    key = stack.admin("create-key", f"ui-{os.urandom(4).hex()}")
    client = stack.client(key)
    response = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": FAST_JOB})
    assert response.status_code == 201, response.text
    return key, client, stack.wait_for_job(client, response.json()["id"], "succeeded")


def ui_client(stack, key: str) -> httpx.Client:
    """A browser-like client: no Authorization header, signed in through the form (the cookie jar keeps the key)."""
    forged = stack.client(None).post("/ui/login", data={"api_key": key}, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 403 and "set-cookie" not in forged.headers  # login CSRF

    browser = stack.client(None)
    response = browser.post("/ui/login", data={"api_key": key}, headers={"Origin": stack.url})
    assert response.status_code == 303 and response.headers["location"].endswith("/ui/jobs"), response.text
    return browser


def test_curves_of_a_job_with_no_epochs_yet_and_while_running(stack):
    client = stack.new_tenant()
    response = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": {**FAST_JOB, "epochs": 40, "lr_decay_epochs": [30]}})
    assert response.status_code == 201, response.text
    job = response.json()
    try:
        empty = client.get(f"/v1/jobs/{job['id']}/curves.png")
        assert empty.status_code == 200
        if not client.get(f"/v1/jobs/{job['id']}/metrics").json():
            assert decode_png(empty.content).std() > 1  # the "no epochs yet" message
        wait_until(lambda: len(client.get(f"/v1/jobs/{job['id']}/metrics").json()) >= 2, 180, "two epochs")
        running = client.get(f"/v1/jobs/{job['id']}/curves.png")
        assert running.status_code == 200 and decode_png(running.content).std() > 10

        page = ui_client(stack, client.headers["authorization"].split()[1]).get(f"/ui/jobs/{job['id']}")
        assert page.status_code == 200 and 'http-equiv="refresh"' in page.text  # live while active
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel")
    stack.wait_for_job(client, job["id"], ("cancelled", "failed", "succeeded"), timeout=120)


# ----- a real browser -----


def chromium_binary() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but no Chromium found; install it: {CHROMIUM_APT}")
    pytest.skip(f"no Chromium found (install it: {CHROMIUM_APT}; REQUIRE_BROWSER=1 makes this a failure)")


class DevTools:
    """Just enough of the Chrome DevTools Protocol: commands on one page, events skipped."""

    def __init__(self, binary: str, profile: Path, log: Path):
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and len(port_file.read_text().split()) == 2, 60, "Chromium's DevTools port")
        port = int(port_file.read_text().split()[0])
        pages = wait_until(lambda: [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"], 30, "a page")
        self.exit = contextlib.ExitStack()
        self.socket = self.exit.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30))
        self.next_id = 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, (method, message["error"])
                return message["result"]

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, ready: str = "true") -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(f"document.readyState === 'complete' && location.href === {json.dumps(url)} && ({ready})", url)

    def wait_for(self, condition: str, what: str) -> None:
        wait_until(lambda: self.evaluate(condition), 30, f"the browser: {what}", interval=0.1)

    def screenshot(self, path: Path, full_page: bool = False) -> bytes:
        params = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            }
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        self.exit.close()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def test_browser_signs_in_and_shows_the_job(stack, finished, tmp_path):
    binary = chromium_binary()
    key, _, job = finished
    browser = DevTools(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        browser.open(f"{stack.url}/ui")
        browser.send("Runtime.evaluate", expression="document.getElementById('api_key').focus()")
        browser.send("Input.insertText", text=key)  # typed, as a person would
        browser.evaluate("document.querySelector('form[action$=\"/ui/login\"] button').click()")
        browser.wait_for("location.pathname === '/ui/jobs' && document.readyState === 'complete'", "the jobs page after signing in")
        assert job["id"] in browser.evaluate("document.body.innerText")
        assert browser.evaluate("document.cookie") == ""  # HttpOnly: no script can read the key
        browser.screenshot(tmp_path / "jobs.png")

        browser.open(f"{stack.url}/ui/jobs/{job['id']}", ready="document.querySelector('img.curves').complete")
        text = browser.evaluate("document.body.innerText")
        assert job["id"] in text and "succeeded" in text and "PGD-20" in text
        assert browser.evaluate("document.querySelector('img.curves').naturalWidth") >= 1000  # the curves loaded, cookie-authenticated

        shot = browser.screenshot(tmp_path / "job.png")
        pixels = decode_png(shot)
        assert pixels.shape == (900, 1280, 3)
        assert pixels.std() > 20
        browser.screenshot(tmp_path / "job-full.png", full_page=True)

        # the API docs render from the service's own files: this browser reaches nothing beyond the machine
        browser.open(f"{stack.url}/docs", ready="document.querySelector('.swagger-ui .info .title') !== null")
        assert "PeerAiD robustification service" in browser.evaluate("document.querySelector('.swagger-ui .info .title').innerText")
        assert browser.evaluate("document.querySelectorAll('.opblock').length") >= 15  # every operation listed
        browser.open(f"{stack.url}/redoc", ready="document.querySelector('h1') !== null")
        assert "PeerAiD" in browser.evaluate("document.querySelector('h1').innerText")
    finally:
        browser.close()
