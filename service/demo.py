"""The end-to-end demo, as a user would do it: submit a job on the offline dataset through the REST
API, follow its live progress, download the robust student, load it and check it reproduces the
reported clean accuracy."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import uuid
from pathlib import Path

import httpx


def _events(client: httpx.Client, path: str):
    with client.stream("GET", path, timeout=httpx.Timeout(10, read=120)) as response:
        response.raise_for_status()
        event, data = None, []
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data.append(line.split(":", 1)[1].strip())
            elif line == "" and event:
                yield event, json.loads("\n".join(data) or "{}")
                event, data = None, []


def _describe(job: dict) -> str:
    p, latest = job["progress"], job.get("latest_metrics") or {}
    parts = [f"{job['status']:<10}", job["phase"]]
    if p.get("images_per_sec"):
        parts.append(f"{p['images_per_sec']:.0f} img/s")
    if p.get("eta_seconds") is not None and job["status"] == "running":
        parts.append(f"ETA {p['eta_seconds']:.0f}s")
    student = latest.get("student")
    if student:
        parts.append(f"val clean {student['clean_acc']:.1%} PGD-10 {student['pgd_acc']:.1%}")
    return " | ".join(parts)


def run_demo(url: str, api_key: str, epochs: int | None = None) -> int:
    from core.engine.sources import load_splits
    from core.engine.evaluation import accuracies
    from core.engine.export import load_model

    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    spec = {} if epochs is None else {"epochs": epochs, "lr_decay_epochs": [max(1, epochs - 2)]}
    response = client.post("/v1/jobs", json={"preset": "digits-demo", "spec": spec}, headers={"Idempotency-Key": str(uuid.uuid4())})
    if response.status_code >= 400:
        print(f"error: {response.status_code} {response.text}", file=sys.stderr)
        return 1
    job = response.json()
    print(f"submitted job {job['id']}: PeerAiD, {job['spec']['student']} student, {job['spec']['epochs']} epochs on '{job['dataset']}'")

    last = ""
    for event, data in _events(client, f"/v1/jobs/{job['id']}/events"):
        if event == "job":
            job, line = data, _describe(data)
            if line != last:
                print(line, flush=True)
                last = line
        elif event == "end":
            break
    if job["status"] != "succeeded":
        print(f"job {job['id']} {job['status']}: {job['error']}", file=sys.stderr)
        return 1

    report = job["result"]
    print(f"\n{'model':<13}{'best epoch':>11}{'clean':>9}{'FGSM':>9}{'PGD-20':>9}{'AutoAttack':>12}")
    for key, m in report.items():
        t = m["test"]
        print(f"{key:<13}{m['best_epoch']:>11}{t['clean_acc']:>9.1%}{t['fgsm_acc']:>9.1%}{t['pgd20_acc']:>9.1%}{t.get('autoattack_acc', float('nan')):>12.1%}")

    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    student = artifacts["student"]
    path = Path(tempfile.mkdtemp(prefix="peeraid-demo-")) / student["file_name"]
    digest = hashlib.sha256()
    with client.stream("GET", student["url"]) as download, open(path, "wb") as f:
        download.raise_for_status()
        for chunk in download.iter_bytes():
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != student["sha256"] or path.stat().st_size != student["size_bytes"]:
        print("error: the downloaded weights do not match their SHA-256", file=sys.stderr)
        return 1
    model, meta = load_model(path)
    spec = job["spec"]
    splits = load_splits(spec["dataset"], val_fraction=spec["val_fraction"], seed=spec["seed"])
    n = spec["evaluation"]["n_examples"] or len(splits.test)
    import torch

    clean = accuracies(model, splits.test.subset(torch.arange(min(n, len(splits.test)))), {"clean": None})["clean"]
    reported = report["student"]["test"]["clean_acc"]
    print(f"\ndownloaded {path} ({student['size_bytes']} bytes, sha256 verified), a {meta['architecture']} "
          f"for {meta['in_channels']}×{meta['input_size']}×{meta['input_size']} inputs")
    print(f"reloaded student clean accuracy {clean:.2%} vs reported {reported:.2%}: "
          f"{'reproduced' if abs(clean - reported) < 1e-9 else 'MISMATCH'}")
    return 0 if abs(clean - reported) < 1e-9 else 1
