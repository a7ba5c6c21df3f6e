"""The model card a job publishes says which upload it was trained on — by the name, id and fingerprint the
API shows for it — and which job trained it (a card named the dataset `data.upload`, with a fingerprint
the API never showed, and no job)."""

from __future__ import annotations

import pytest


def test_the_model_card_names_the_upload_its_fingerprint_and_the_job(finished):
    client, dataset, job = finished
    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    card = client.get(artifacts["model_card"]["url"]).json()
    assert card["job_id"] == job["id"]
    assert card["dataset"]["name"] == dataset["name"] == "owned" and card["dataset"]["id"] == dataset["id"]
    assert card["dataset"]["fingerprint"] == dataset["fingerprint"]
    markdown = client.get(artifacts["model_card_markdown"]["url"]).text
    assert f"by job `{job['id']}`" in markdown and f"`owned` (id `{dataset['id']}`)" in markdown
    assert dataset["fingerprint"] in markdown and "data.upload" not in markdown


@pytest.mark.slow  # AutoAttack, on 8 images
def test_a_class_sorted_folder_upload_is_evaluated_on_a_stratified_sample_of_every_class(new_client, settings, tmp_path):
    """The new user's case: a zip of class folders (its test split sorted by class), a subset evaluation and
    AutoAttack on fewer images. Every class is in every sample, the figures come per class, and say so."""
    from bench.user_data import write_zip

    from .conftest import run_job_here

    client = new_client()
    archive = write_zip(tmp_path / "textures.zip", n_train=20, n_test=10, size=16)
    dataset = client.post("/v1/datasets", params={"name": "textures", "filename": "textures.zip"}, content=archive.read_bytes())
    assert dataset.status_code == 201, dataset.text
    spec = {"epochs": 2, "lr_decay_epochs": [1], "attack_steps": 2, "eval_pgd_steps": 2, "swa": False}
    evaluation = {"n_examples": 20, "autoattack_n_examples": 8, "batch_size": 20, "pgd_steps": 3}
    response = client.post("/v1/jobs", json={"preset": "small-data", "dataset": "textures", "spec": {**spec, "evaluation": evaluation}})
    assert response.status_code == 201, response.text
    assert run_job_here(settings, response.json()["id"])["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{response.json()['id']}").json()

    sample = job["evaluation"]["sample"]
    assert sample["per_class"] == {
        "evaluated": {"bark": 5, "brick": 5, "grass": 5, "gravel": 5},
        "autoattack": {"bark": 2, "brick": 2, "grass": 2, "gravel": 2},
    }
    assert job["evaluation"]["images"] == {"clean_acc": 20, "fgsm_acc": 20, "pgd3_acc": 20, "autoattack_acc": 8}
    student = job["result"]["student"]
    assert {c for figures in student["test_per_class"].values() for c in figures} == {"bark", "brick", "grass", "gravel"}
    assert set(student["test_on_autoattack_images"]) == {"clean_acc", "fgsm_acc", "pgd3_acc", "autoattack_acc"}
    assert student["test_on_autoattack_images"]["autoattack_acc"] <= student["test_on_autoattack_images"]["pgd3_acc"]
    subset = [w for w in job["warnings"] if w["kind"] == "subset"]
    assert len(subset) == 1 and subset[0]["message"].startswith("every figure comes from 20 of the 40 test images")
