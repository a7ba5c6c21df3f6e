"""Security over HTTP: every route checks the tenant and the key (enumerated from the live OpenAPI
schema, so new routes are covered), hostile uploads are refused with a 4xx naming the problem while
the server stays healthy, per-tenant limits answer 429/413, and keys are stored hashed."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests.test_dataset_files import class_tree, npz_arrays, png, rgb, save_npz, tar_with, write_tar, write_zip

from tests.stack import FAST_JOB

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def owner_things(stack, digits_npz_bytes):
    owner = stack.new_tenant()
    dataset = owner.post("/v1/datasets", params={"name": "owned"}, content=digits_npz_bytes).json()
    job = owner.post("/v1/jobs", json={"preset": "digits-demo", "dataset": dataset["id"],
                                       "spec": {**FAST_JOB, "epochs": 2, "lr_decay_epochs": [1]}}).json()
    stack.wait_for_job(owner, job["id"], "succeeded")
    return owner, dataset["id"], job["id"]


def v1_operations(client):
    schema = client.get("/openapi.json").json()
    for path, methods in schema["paths"].items():
        if path.startswith("/v1/"):
            for method in methods:
                yield method.upper(), path


def test_every_route_checks_the_key_and_the_tenant(stack, owner_things):
    owner, dataset_id, job_id = owner_things
    intruder, anonymous = stack.new_tenant(), stack.client(None)
    fill = {"{job_id}": job_id, "{dataset_id}": dataset_id, "{name}": "student"}
    checked = 0
    for method, template in v1_operations(owner):
        path = template
        for placeholder, value in fill.items():
            path = path.replace(placeholder, value)
        assert "{" not in path, f"the matrix does not know a placeholder in {template}; extend `fill`"
        response = anonymous.request(method, path)
        assert response.status_code == 401, (method, template, response.status_code)
        if path != template:  # the route names one of the owner's things
            response = intruder.request(method, path)
            assert response.status_code == 404, (method, template, response.status_code, response.text)
            checked += 1
    assert checked >= 9
    assert owner.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"  # untouched by the attempts
    assert owner.get(f"/v1/datasets/{dataset_id}").status_code == 200


def hostile_corpus(tmp_path):
    """name → (file bytes, a fragment the error must contain). Built with the engine tests' helpers."""
    def read(path):
        return path.read_bytes()

    def npz_with(**changes):
        return read(save_npz(tmp_path / "x.npz", **{**npz_arrays(), **changes}))

    def tar_link(kind):
        member = tarfile.TarInfo("cat/link.png")
        member.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
        member.linkname = "/etc/passwd"
        return read(tar_with(tmp_path / f"{kind}.tar", member))

    good_zip = read(write_zip(tmp_path / "good.zip", class_tree()))
    return {
        "truncated.zip": (good_zip[: len(good_zip) // 2], "truncated"),
        "truncated.tar.gz": (read(write_tar(tmp_path / "t.tar.gz", class_tree()))[:300], "truncated"),
        "garbage.bin": (bytes(range(256)) * 8, "unrecognised"),
        "bomb.zip": (read(write_zip(tmp_path / "bomb.zip", {"cat/a.png": bytes(50 << 20)})), "compression ratio"),
        "escape.zip": (read(write_zip(tmp_path / "e.zip", {"../evil.png": png(rgb()), **class_tree()})), "../evil.png"),
        "absolute.tar": (read(write_tar(tmp_path / "a.tar", {"/etc/evil.png": png(rgb()), **class_tree()}, "w")), "/etc/evil.png"),
        "symlink.tar": (tar_link("symlink"), "link"),
        "hardlink.tar": (tar_link("hardlink"), "link"),
        "notimage.zip": (read(write_zip(tmp_path / "n.zip", {**class_tree(), "cat/readme.txt": b"hello"})), "readme.txt"),
        "mixed.zip": (read(write_zip(tmp_path / "m.zip", {**class_tree(), "dog/big.png": png(rgb(12))})), "mixed image sizes"),
        "oneclass.zip": (read(write_zip(tmp_path / "o.zip", class_tree(classes=("cat",)))), "class"),
        "labels.npz": (npz_with(y_test=np.array([0, 1, 2, 9, 0, 1])), "9"),
        "nan.npz": (npz_with(x_train=np.full((12, 8, 8, 3), np.nan, np.float32)), "NaN"),
        "dtype.npz": (npz_with(x_train=np.zeros((12, 8, 8, 3), np.complex64)), "complex"),
        "pickle.npz": (npz_with(y_train=np.array([object()] * 12, dtype=object)), "pickle"),
    }


def stored_files(stack) -> set:
    return {p for p in (stack.data_dir / "datasets").rglob("*") if p.is_file()} if (stack.data_dir / "datasets").exists() else set()


def test_hostile_uploads_are_refused_and_the_server_stays_healthy(stack, tmp_path):
    client = stack.new_tenant()
    before = stored_files(stack)
    for filename, (content, fragment) in hostile_corpus(tmp_path).items():
        response = client.post("/v1/datasets", params={"name": "hostile", "filename": filename}, content=content)
        detail = response.json().get("detail", "")
        assert 400 <= response.status_code < 500, (filename, response.status_code, detail)
        assert fragment.lower() in str(detail).lower(), (filename, detail)
        assert filename in str(detail), (filename, detail)
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert [d for d in client.get("/v1/datasets").json()["items"] if not d["builtin"]] == []
    assert stored_files(stack) == before, "nothing of a refused upload stays on disk"


def test_an_architecture_too_large_for_the_input_is_refused(stack):
    client = stack.new_tenant()
    arrays = npz_arrays(shape=(4, 4, 3))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    dataset = client.post("/v1/datasets", params={"name": "tiny"}, content=buffer.getvalue()).json()
    response = client.post("/v1/jobs", json={"preset": "cifar10-resnet18", "dataset": dataset["id"]})
    assert response.status_code == 422
    assert "resnet18 needs inputs of at least 8×8" in str(response.json()["detail"])


def test_per_tenant_limits_answer_429_and_413(stack, digits_npz_bytes):
    stack.admin("set-limits", "limited", "--max-concurrent-jobs", "1", "--max-upload-bytes", "100000")
    client = stack.client(stack.admin("create-key", "limited"))
    first = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": {**FAST_JOB, "epochs": 30, "lr_decay_epochs": [20]}})
    assert first.status_code == 201
    second = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": FAST_JOB})
    assert second.status_code == 429 and "limit 1" in second.json()["detail"] and "retry-after" in second.headers
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    too_big = client.post("/v1/datasets", params={"name": "big", "filename": "digits.npz"}, content=digits_npz_bytes)
    assert too_big.status_code == 413 and "100000" in too_big.json()["detail"]


def test_api_keys_are_stored_only_as_hashes(stack):
    key = stack.admin("create-key", "hash-check")
    url = stack.env.get("PEERAID_DATABASE_URL") or f"sqlite:///{stack.data_dir / 'peeraid.sqlite'}"
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT prefix, key_hash FROM api_keys")).all()
    engine.dispose()
    secret = key.split("_", 2)[2]
    assert rows and all(secret not in (prefix + key_hash) for prefix, key_hash in rows)
    assert any(key.split("_")[1] == prefix for prefix, _ in rows)
