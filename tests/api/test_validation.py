"""Bad input gets a 4xx that names the field or file at fault, and leaves nothing behind: job specs,
uploads (broken, hostile, oversized), architectures too large for the data."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
import pytest

from tests.stack import UPLOAD_LIMIT
from tests.test_dataset_files import class_tree, npz_arrays, png, rgb, save_npz, tar_with, write_tar, write_zip

from .conftest import run_job_here


@pytest.mark.parametrize(
    "body,field,fragment",
    [
        ({"preset": "digits-demo", "spec": {"epsilon": 3}}, "epsilon", "less than or equal to 0.5"),
        ({"preset": "digits-demo", "spec": {"student": "resnet9000"}}, "student", "unknown architecture"),
        ({"preset": "digits-demo", "spec": {"epochs": "many"}}, "epochs", "valid integer"),
        ({"preset": "digits-demo", "spec": {"warp": 9}}, "warp", "unknown field"),
        ({"preset": "no-such-preset"}, "preset", "unknown preset"),
        ({"preset": "digits-demo", "dataset": "ds_missing"}, "dataset", "unknown dataset"),
        ({"preset": "digits-demo", "specs": {}}, "specs", "unknown field"),
    ],
)
def test_invalid_job_specs_are_422_naming_the_field(client, body, field, fragment):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in ".".join(map(str, d["loc"])) and fragment in d["msg"] for d in detail), detail


def zip_with(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD = dict(
    x_train=np.zeros((8, 4, 4, 1), np.uint8), y_train=np.arange(8) % 2, x_test=np.zeros((2, 4, 4, 1), np.uint8), y_test=np.arange(2)
)


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
        "broken.zip": (zip_with({"a/x.png": b"x" * 100})[:60], "broken.zip"),
        "notes.txt": (b"hello, these are not images", "unrecognised file format"),
        "evil.zip": (zip_with({"../evil/x.png": b"123"}), "evil.zip"),
        "text.zip": (zip_with({"cats/readme.txt": b"meow", "dogs/readme.txt": b"woof"}), "readme.txt"),
        "nan-small.npz": (npz(**{**GOOD, "x_train": np.full((8, 4, 4, 1), np.nan, np.float32)}), "NaN"),
        "keys.npz": (npz(x_train=GOOD["x_train"]), "y_train"),
        "pickled.npz": (npz(**{**GOOD, "y_test": np.array([object(), 1], dtype=object)}), "pickled.npz"),
        "empty.bin": (b"", "empty"),
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


def stored_files(settings) -> set:
    root = settings.data_dir / "datasets"
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def test_hostile_and_broken_uploads_are_4xx_naming_the_file_and_leave_nothing(new_client, settings, tmp_path):
    client = new_client()
    before = stored_files(settings)
    for filename, (content, fragment) in hostile_corpus(tmp_path).items():
        response = client.post("/v1/datasets", params={"name": "hostile", "filename": filename}, content=content)
        detail = str(response.json().get("detail", ""))
        assert 400 <= response.status_code < 500, (filename, response.status_code, detail)
        assert fragment.lower() in detail.lower(), (filename, detail)
        assert filename in detail or fragment in detail, (filename, detail)
        assert str(settings.data_dir) not in response.text, "server paths must not leak"
    assert client.get("/healthz").status_code == 200
    assert [d for d in client.get("/v1/datasets").json()["items"] if not d["builtin"]] == []
    assert stored_files(settings) == before, "nothing of a refused upload stays on disk"


def test_an_upload_over_the_limit_is_413_and_leaves_nothing_behind(client, settings):
    before = client.get("/v1/datasets").json()["items"]
    blob = os.urandom(UPLOAD_LIMIT + 1)

    def chunks():  # no Content-Length: the server must cut the stream itself
        for start in range(0, len(blob), 1 << 20):
            yield blob[start : start + (1 << 20)]

    for content in (blob, chunks()):
        response = client.post("/v1/datasets", params={"name": "huge", "filename": "huge.zip"}, content=content)
        assert response.status_code == 413, response.text
        assert "huge.zip" in response.json()["detail"] and str(UPLOAD_LIMIT) in response.json()["detail"]
    assert client.get("/v1/datasets").json()["items"] == before
    assert not [p for p in stored_files(settings) if p.name.endswith(".partial") or p.stat().st_size > UPLOAD_LIMIT]


def test_an_architecture_too_large_for_the_input_is_refused(client):
    buffer = io.BytesIO()
    np.savez(buffer, **npz_arrays(shape=(4, 4, 3)))
    dataset = client.post("/v1/datasets", params={"name": "tiny"}, content=buffer.getvalue()).json()
    response = client.post("/v1/jobs", json={"preset": "cifar10-resnet18", "dataset": dataset["id"]})
    assert response.status_code == 422
    assert "resnet18 needs inputs of at least" in str(response.json()["detail"])


def test_a_multipart_upload_is_streamed_like_a_raw_one(new_client, settings, digits_npz_bytes):
    client = new_client()
    raw = client.post("/v1/datasets", params={"name": "raw", "filename": "digits.npz"}, content=digits_npz_bytes).json()
    form = client.post("/v1/datasets", files={"file": ("my digits (v2).npz", digits_npz_bytes, "application/octet-stream")})
    assert form.status_code == 201, form.text
    dataset = form.json()
    assert dataset["file_name"] == "my digits _v2_.npz" and dataset["name"] == "my digits _v2_"  # name from the file's name
    assert dataset["sha256"] == raw["sha256"] and dataset["fingerprint"] == raw["fingerprint"]
    stored = settings.data_dir / "datasets"
    assert any(p.read_bytes() == digits_npz_bytes for p in stored.rglob("data.upload"))


def test_a_multipart_body_without_a_file_or_over_the_limit_is_refused_and_leaves_nothing(client, settings):
    before = stored_files(settings)
    no_file = client.post("/v1/datasets", params={"name": "x"}, data={"note": "no file here"}, files={"other": (None, b"just a field")})
    assert no_file.status_code == 422 and "no file" in no_file.json()["detail"]
    too_big = client.post("/v1/datasets", files={"file": ("big.zip", os.urandom(UPLOAD_LIMIT + 1))})
    assert too_big.status_code == 413 and "big.zip" in too_big.json()["detail"]
    assert stored_files(settings) == before


def test_a_multipart_boundary_over_256_characters_is_a_4xx_naming_it(client, settings):
    """python-multipart refuses such a boundary with an error of its own, which escaped as a 500."""
    before = stored_files(settings)
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\nhello\r\n--{boundary}--\r\n'
    response = client.post("/v1/datasets", content=body.encode(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 422, response.text
    assert "boundary is 300 characters long, over the 256 accepted" in response.json()["detail"]
    assert stored_files(settings) == before


def test_mixed_image_sizes_need_resize_and_a_job_trains_on_the_resized_images(new_client, settings, tmp_path):
    client = new_client()
    mixed = write_zip(tmp_path / "mixed.zip", {**class_tree(("cat", "dog"), 12), "dog/big.png": png(rgb(12))}).read_bytes()
    refused = client.post("/v1/datasets", params={"name": "mixed", "filename": "mixed.zip"}, content=mixed)
    assert refused.status_code == 422 and "resize=" in refused.json()["detail"]
    assert client.post("/v1/datasets", params={"name": "mixed", "resize": "0x8"}, content=mixed).status_code == 422
    response = client.post("/v1/datasets", params={"name": "mixed", "filename": "mixed.zip", "resize": "10x10"}, content=mixed)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["input_shape"] == [3, 10, 10] and dataset["resize"] == [10, 10]
    job = client.post(
        "/v1/jobs",
        json={
            "preset": "digits-demo",
            "dataset": dataset["id"],
            "spec": {
                "epochs": 1,
                "lr_decay_epochs": [],
                "swa": False,
                "attack_steps": 1,
                "eval_pgd_steps": 1,
                "batch_size": 8,
                "evaluation": {"n_examples": 4, "autoattack": False},
            },
        },
    ).json()
    assert run_job_here(settings, job["id"])["status"] == "succeeded", client.get(f"/v1/jobs/{job['id']}").json()["error"]


def test_an_upload_labelled_as_a_form_as_curl_data_binary_does_streams_like_any_other(client, tmp_path):
    """`curl --data-binary @f.zip` sends Content-Type: application/x-www-form-urlencoded; the JSON/form body cap must not apply."""
    big = write_zip(tmp_path / "big.zip", class_tree(("cat", "dog"), 60, make=lambda: rgb(48)), compression=zipfile.ZIP_STORED)
    assert big.stat().st_size > 300_000  # over the JSON and form body cap
    response = client.post(
        "/v1/datasets", params={"name": "curl"}, content=big.read_bytes(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["num_train"] + response.json()["num_test"] == 120
