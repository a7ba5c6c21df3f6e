"""The model card a job publishes says which upload it was trained on — by the name, id and fingerprint the
API shows for it — and which job trained it (a card named the dataset `data.upload`, with a fingerprint
the API never showed, and no job)."""

from __future__ import annotations


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
