"""Hostile input costs little and gets a 4xx: control characters in names and ids, oversized and deeply
nested JSON, bodies with thousands of unknown keys, broken JSON."""

from __future__ import annotations

import json
import time

import pytest

NUL = "\x00"


@pytest.mark.parametrize("path", ["/v1/jobs/job_%00x", "/v1/jobs/a%00b/metrics", "/v1/datasets/ds_%01", "/v1/jobs/{job}/artifacts/st%00"])
def test_control_characters_in_ids_are_422(finished, path):
    owner, _, job = finished
    response = owner.get(path.format(job=job["id"]))
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    "body,field",
    [
        ({"preset": "digits-demo", "dataset": f"ds_{NUL}"}, "dataset"),
        ({"preset": "digits-demo", "spec": {"dataset": f"ds_{NUL}1"}}, "dataset"),
        ({"preset": f"digits{NUL}"}, "preset"),
        ({"preset": "digits-demo", "dataset": "tab\there"}, "dataset"),
    ],
)
def test_control_characters_in_references_are_422_naming_the_field(client, body, field):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert any(d["loc"][-1] == field for d in response.json()["detail"]), response.json()


def test_a_control_character_in_a_dataset_name_is_422_and_stores_nothing(client, settings, digits_npz_bytes):
    before = {p for p in (settings.data_dir / "datasets").rglob("*")} if (settings.data_dir / "datasets").exists() else set()
    response = client.post("/v1/datasets", params={"name": f"pets{NUL}", "filename": "pets.npz"}, content=digits_npz_bytes)
    assert response.status_code == 422 and "name" in response.text
    after = {p for p in (settings.data_dir / "datasets").rglob("*")} if (settings.data_dir / "datasets").exists() else set()
    assert after == before


def test_deeply_nested_json_is_refused_quickly(client):
    deep = '{"spec": ' + '{"a": ' * 900 + "1" + "}" * 900 + "}"
    started = time.perf_counter()
    response = client.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "nested deeper than 32" in response.json()["detail"]
    assert time.perf_counter() - started < 2


def test_an_oversized_json_body_is_413(client, settings):
    body = json.dumps({"preset": "digits-demo", "spec": {f"k{i}": i for i in range(500_000)}})
    assert len(body) > 8_000_000
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and str(settings.max_json_bytes) in response.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_many_unknown_fields_give_a_bounded_error_body(client):
    response = client.post("/v1/jobs", json={"preset": "digits-demo", **{f"unknown{i}": i for i in range(5_000)}})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 21 and detail[-1]["msg"] == "and 4980 more errors"
    assert len(response.content) < 10_000 and "input" not in detail[0]


def test_broken_json_is_422(client):
    response = client.post("/v1/jobs", content=b'{"preset": "digits-demo",', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.text
