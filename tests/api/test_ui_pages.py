"""The web UI (/ui) without a browser: cookie sign-in (with its CSRF check), the jobs list, the job page,
its curves and downloads, another tenant's job, escaping of user-supplied names; and the curves PNG."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from PIL import Image

from core.db import tenants
from core.db.session import database
from tests.stack import FAST_JOB

from .conftest import create_key

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORIGIN = "http://testserver"


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def signed_in(new_client, key: str):
    browser = new_client(None)
    response = browser.post("/ui/login", data={"api_key": key}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].endswith("/ui/jobs"), response.text
    return browser


def owner_key(finished) -> str:
    return finished[0].headers["authorization"].split()[1]


def test_curves_png_of_a_finished_job(new_client, finished):
    client, _, job = finished
    response = client.get(f"/v1/jobs/{job['id']}/curves.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    pixels = decode_png(response.content)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 1000
    assert pixels.std() > 10  # lines, labels and legends, not a blank canvas
    unchanged = client.get(f"/v1/jobs/{job['id']}/curves.png", headers={"If-None-Match": response.headers["etag"]})
    assert unchanged.status_code == 304 and not unchanged.content  # auto-refreshing pages do not re-render


def test_ui_sign_in_and_jobs_list(new_client, finished):
    key, job = owner_key(finished), finished[2]
    anonymous = new_client(None)
    form = anonymous.get("/ui")
    assert form.status_code == 200 and 'name="api_key"' in form.text
    assert anonymous.get("/ui/jobs", follow_redirects=False).status_code == 303  # to the sign-in form

    bad = anonymous.post("/ui/login", data={"api_key": "pk_0000_nonsense"}, headers={"Origin": ORIGIN})
    assert bad.status_code == 401 and 'name="api_key"' in bad.text and "not valid" in bad.text
    assert not anonymous.cookies

    # login CSRF: a form from another site, or from nowhere we can tell, signs nobody in
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {},
        {"Referer": "https://evil.example/ui"},
        {"Origin": "http://testserver.evil.example"},
    ):
        forged = new_client(None).post("/ui/login", data={"api_key": key}, headers=headers)
        assert forged.status_code == 403 and "set-cookie" not in forged.headers, headers

    by_referer = new_client(None).post("/ui/login", data={"api_key": key}, headers={"Referer": f"{ORIGIN}/ui"}, follow_redirects=False)
    assert by_referer.status_code == 303  # no Origin header, but a same-site Referer

    browser = new_client(None)
    response = browser.post("/ui/login", data={"api_key": key}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/jobs"  # a path: no Host header in it
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert key.split("_", 2)[2].lower() not in cookie, "the cookie holds a session token, never the API key"
    jobs = browser.get("/ui/jobs")
    assert jobs.status_code == 200 and job["id"] in jobs.text and "succeeded" in jobs.text
    assert browser.get("/ui", follow_redirects=False).status_code == 303  # signed in: straight to the jobs

    # the cookie is the UI's only: /v1 still wants a Bearer key
    assert new_client(None).get("/v1/jobs", headers={"Cookie": f"peeraid_key={key}"}).status_code == 401

    assert browser.post("/ui/logout", follow_redirects=False).status_code == 403  # a forged sign-out is refused too
    assert browser.get("/ui/jobs").status_code == 200
    session_cookie = browser.cookies["peeraid_session"]
    assert browser.post("/ui/logout", headers={"Origin": ORIGIN}, follow_redirects=False).status_code == 303
    assert browser.get("/ui/jobs", follow_redirects=False).status_code == 303
    replayed = new_client(None)
    replayed.cookies.set("peeraid_session", session_cookie, path="/ui")
    assert replayed.get("/ui/jobs", follow_redirects=False).status_code == 303, "a signed-out session is gone on the server"


def test_revoking_the_key_ends_its_ui_sessions(new_client, settings):
    key = create_key(settings)
    browser = signed_in(new_client, key)
    assert browser.get("/ui/jobs").status_code == 200
    with database(settings.resolved_database_url).transaction() as session:
        tenants.revoke_key(session, tenants.key_prefix(key))
    assert browser.get("/ui/jobs", follow_redirects=False).status_code == 303


def test_ui_job_page_metrics_and_downloads(new_client, finished):
    client, _, job = finished
    browser = signed_in(new_client, owner_key(finished))
    page = browser.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200 and job["id"] in page.text
    assert 'http-equiv="refresh"' not in page.text
    test = job["result"]["student"]["test"]
    for text in ("PGD-20", "SWA student", f"{test['clean_acc'] * 100:.1f}%", f"{test['pgd20_acc'] * 100:.1f}%"):
        assert text in page.text, text

    image = re.search(r'<img class="curves" src="([^"]+)"', page.text).group(1).replace("&amp;", "&")
    response = browser.get(image)
    assert response.status_code == 200 and decode_png(response.content).std() > 10

    listing = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    links = {name: url for url, name in re.findall(r'href="([^"]+/artifacts/([\w.-]+))"', page.text)}
    assert set(links) == set(listing) and {"student", "swa_student", "peer", "model_card"} <= set(listing)
    for name, url in links.items():
        download = browser.get(url)
        assert download.status_code == 200, (name, download.text[:200])
        assert hashlib.sha256(download.content).hexdigest() == listing[name]["sha256"]
        assert len(download.content) == listing[name]["size_bytes"]
    assert new_client(None).get(links["student"], follow_redirects=False).status_code == 303  # no cookie: no bytes


def test_ui_another_tenants_job_is_not_found(new_client, finished, settings):
    job = finished[2]
    intruder = signed_in(new_client, create_key(settings))
    for path in (f"/ui/jobs/{job['id']}", f"/ui/jobs/{job['id']}/curves.png", f"/ui/jobs/{job['id']}/artifacts/student"):
        response = intruder.get(path)
        assert response.status_code == 404, path
        assert "Not found" in response.text
    assert job["id"] not in intruder.get("/ui/jobs").text


def test_ui_escapes_user_supplied_names(new_client, digits_npz_bytes):
    client = new_client()
    name = "<script>alert(1)</script>"
    dataset = client.post("/v1/datasets", params={"name": name, "filename": "digits.npz"}, content=digits_npz_bytes)
    assert dataset.status_code == 201, dataset.text
    job = client.post("/v1/jobs", json={"preset": "digits-demo", "dataset": dataset.json()["id"], "spec": FAST_JOB}).json()
    browser = signed_in(new_client, client.headers["authorization"].split()[1])
    for path in ("/ui/jobs", f"/ui/jobs/{job['id']}"):
        page = browser.get(path)
        assert page.status_code == 200 and job["id"] in page.text
        assert name not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "script-src" not in page.headers["content-security-policy"]  # and no script may run anyway
        assert 'http-equiv="refresh"' in page.text  # a queued job: the page refreshes itself
    client.post(f"/v1/jobs/{job['id']}/cancel")


def test_job_page_shows_warnings_evaluation_gaps_and_never_calls_a_failed_job_done(new_client, settings, digits_npz_bytes):
    from sqlalchemy import update

    from core.db.models import Job

    client = new_client()
    ok, failed = (client.post("/v1/jobs", json={"preset": "digits-demo", "spec": FAST_JOB}).json() for _ in range(2))
    result = {
        "student": {
            "best_epoch": 3,
            "validation": {},
            "test": {"clean_acc": 0.34, "pgd7_acc": 0.30, "autoattack_acc": 0.25},
            "test_per_class": {
                "clean_acc": {"cats": 0.5, "dogs": 0.25},
                "pgd7_acc": {"cats": 0.375, "dogs": 0.125},
                "autoattack_acc": {"cats": 0.25, "dogs": 0.0},
            },
            "test_on_autoattack_images": {"clean_acc": 0.41, "pgd7_acc": 0.29, "autoattack_acc": 0.25},
        }
    }
    with database(settings.resolved_database_url).transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == ok["id"])
            .values(
                status="succeeded",
                phase="succeeded",
                result=result,
                evaluation={
                    "status": "incomplete",
                    "images": {"clean_acc": 50, "pgd7_acc": 50, "autoattack_acc": 20},
                    "sample": {
                        "test_images": 200,
                        "evaluated": 50,
                        "autoattack": 20,
                        "method": "class-stratified sample",
                        "seed": 7,
                        "per_class": {"evaluated": {"cats": 25, "dogs": 25}, "autoattack": {"cats": 10, "dogs": 10}},
                    },
                    "autoattack": {"description": "adapted to 2 classes (the DLR losses need 3 classes or more), L∞: APGD-CE"},
                    "failures": [{"model": "student", "attack": "AutoAttack", "error": "IndexError: boom"}],
                },
                warnings=[
                    {
                        "model": "student",
                        "kind": "chance",
                        "message": "clean accuracy 34% is at chance for 3 classes",
                        "advice": "train longer or check the labels",
                    }
                ],
            )
        )
        session.execute(
            update(Job)
            .where(Job.id == failed["id"])
            .values(status="failed", phase="failed", error="diverged", progress={"fraction": 1.0, "epoch": 4, "epochs": 4})
        )
    browser = signed_in(new_client, client.headers["authorization"].split()[1])
    page = browser.get(f"/ui/jobs/{ok['id']}").text
    for text in (
        "PGD-7",
        "34.0%",
        "at chance for 3 classes",
        "train longer or check the labels",
        "Not evaluated: AutoAttack",
        "IndexError: boom",
        "Test images per attack: Clean 50",
        "class-stratified sample of the 200 test images, seed 7",
        "AutoAttack: adapted to 2 classes (the DLR losses need 3 classes or more), L∞: APGD-CE.",
        "On the 20 images AutoAttack ran on, every attack",
        "41.0%",
        "accuracy per class",
        "25 (10 AutoAttack)",
        "37.5%",
    ):
        assert text in page, text
    assert "{&#39;" not in page and "{'" not in page  # no Python dict printed raw
    assert "pgd20" not in page.lower()
    failed_page = browser.get(f"/ui/jobs/{failed['id']}").text
    assert "failed at 100.0%" in failed_page and ">done<" not in failed_page
