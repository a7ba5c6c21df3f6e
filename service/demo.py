"""The end-to-end demo, as a user would do it, through the Python client (peeraid_client): submit a
job on the offline dataset, follow its live progress, download the robust student (size and SHA-256
verified), load it with the engine and check it reproduces the reported clean accuracy."""

from __future__ import annotations

import logging
import sys
import tempfile
from typing import Any

from core.engine.report import metric_label
from peeraid_client import Client, ConnectionFailed, PeeraidError
from peeraid_client.progress import TERMINAL_STATUSES, describe_progress


def run_demo(url: str, api_key: str, epochs: int | None = None, where: str | None = None) -> int:
    """`where`: how `url` was found, said first (a demo at the wrong address is otherwise a puzzle)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress
    spec: dict[str, Any] = {} if epochs is None else {"epochs": epochs}  # the preset's schedule follows, in proportion
    print(f"PeerAiD service at {url}" + (f" ({where})" if where else ""), flush=True)
    try:
        with Client(url, api_key) as client:
            job = client.submit_job(preset="digits-demo", spec=spec)
            print(
                f"submitted job {job['id']}: PeerAiD, {job['spec']['student']} student, {job['spec']['epochs']} epochs "
                f"on '{job['dataset']}'"
            )
            job = _follow(client, job)
            if job["status"] != "succeeded":
                print(f"job {job['id']} {job['status']}: {job['error']}", file=sys.stderr)
                return 1
            print("\n" + _report(job["result"]))
            weights = client.download_artifact(job["id"], "student", tempfile.mkdtemp(prefix="peeraid-demo-"))
    except ConnectionFailed as err:
        print(f"error: {err}\nhint: is the service running? `make run` in another terminal, or --url", file=sys.stderr)
        return 1
    except PeeraidError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return _check_reproduced(job, weights)


def _follow(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    last = ""
    for event, data in client.events(job["id"]):
        if event != "job":
            continue
        job = data
        line = f"{job['status']:<10} {describe_progress(job)}"
        if line != last:
            print(line, flush=True)
            last = line
        if job["status"] in TERMINAL_STATUSES:
            break
    return job


def _report(result: dict[str, Any]) -> str:
    names = list(next(iter(result.values()))["test"])
    lines = [f"{'model':<13}{'best epoch':>11}" + "".join(f"{metric_label(n):>12}" for n in names)]
    for key, m in result.items():
        lines.append(f"{key:<13}{m['best_epoch']:>11}" + "".join(f"{m['test'].get(n, float('nan')):>12.1%}" for n in names))
    return "\n".join(lines)


def _check_reproduced(job: dict[str, Any], weights: Any) -> int:
    from core.engine.evaluation import accuracies, evaluation_sample
    from core.engine.export import load_model
    from core.engine.sources import load_splits

    model, meta = load_model(weights)
    spec = job["spec"]
    splits = load_splits(spec["dataset"], val_fraction=spec["val_fraction"], seed=spec["seed"])
    ev = spec["evaluation"]
    sample = evaluation_sample(splits.test, ev["n_examples"], ev["autoattack_n_examples"], spec["seed"])
    clean = accuracies(model, splits.test.subset(sample.index), {"clean": None})["clean"]
    reported = job["result"]["student"]["test"]["clean_acc"]
    print(
        f"\ndownloaded {weights} (size and SHA-256 verified), a {meta['architecture']} "
        f"for {meta['in_channels']}×{meta['input_size']}×{meta['input_size']} inputs"
    )
    reproduced = abs(clean - reported) < 1e-9
    print(f"reloaded student clean accuracy {clean:.2%} vs reported {reported:.2%}: {'reproduced' if reproduced else 'MISMATCH'}")
    return 0 if reproduced else 1
