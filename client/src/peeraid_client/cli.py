"""`peeraid`: the PeerAiD robustification service from the command line.

    peeraid datasets upload cats.zip --name cats
    peeraid jobs submit --preset cifar10-resnet18 --dataset ds_... --set epochs=100 --watch
    peeraid jobs download job_... -o weights/

The service and key come from --url/--api-key, else $PEERAID_URL/$PEERAID_API_KEY, else
~/.config/peeraid/config.toml (or $PEERAID_CONFIG) with `url = "..."` and `api_key = "..."`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .client import ARTIFACT_NAMES, Client
from .config import config_path, key_hint
from .errors import AuthenticationError, Conflict, PeeraidError, ValidationError
from .progress import TERMINAL_STATUSES, describe_progress, epoch_text, format_bytes, format_duration, percent, progress_text

JOB_STATUSES = ("queued", "running", "evaluating", "succeeded", "failed", "cancelled")


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2, like argparse's own)."""


class Hinted(PeeraidError):
    """A service error with what to do about it on the command line (printed as `hint: ...`)."""

    def __init__(self, message: str, hint: str):
        super().__init__(None, message)
        self.hint = hint


# --- formatting ------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def timestamp(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def metrics_text(metrics: dict[str, Any] | None) -> str:
    """`student clean 82.0% PGD 48.0% (epoch 3); swa_student ...` from latest_metrics or best_metrics."""
    if not metrics:
        return "-"
    parts = []
    for key in ("student", "swa_student"):
        m = metrics.get(key)
        if not m:
            continue
        epoch = m.get("epoch", metrics.get("epoch"))
        text = f"{key} clean {percent(m.get('clean_acc'))} PGD {percent(m.get('pgd_acc'))}"
        parts.append(text + (f" (epoch {epoch})" if isinstance(epoch, int) else ""))
    return "; ".join(parts) or "-"


def report_table(result: dict[str, Any]) -> str:
    """The final test-set report: one row per exported model, one column per attack; where AutoAttack ran on
    fewer images, a row per model with every attack on AutoAttack's images."""
    names: list[str] = []
    for m in result.values():
        names += [n for n in m.get("test", {}) if n not in names]
    rows = [[key, m.get("best_epoch"), *(percent(m["test"].get(n)) for n in names)] for key, m in result.items()]
    rows += [
        [f"{key} (AutoAttack's images)", m.get("best_epoch"), *(percent(m["test_on_autoattack_images"].get(n)) for n in names)]
        for key, m in result.items()
        if m.get("test_on_autoattack_images")
    ]
    return table(["model", "epoch", *(n.removesuffix("_acc") for n in names)], rows)


MAX_PER_CLASS_ROWS = 20


def per_class_table(job: dict[str, Any], model: str = "student") -> str:
    """The model's accuracy per class under each attack (AutoAttack's on its own images), with each class's test
    images; "" where the report has none."""
    by_metric = ((job.get("result") or {}).get(model) or {}).get("test_per_class") or {}
    if not by_metric:
        return ""
    counts = (((job.get("evaluation") or {}).get("sample") or {}).get("per_class") or {}).get("evaluated") or {}
    classes = list(dict.fromkeys(c for figures in by_metric.values() for c in figures))
    rows = [[name, counts.get(name), *(percent(by_metric[k].get(name)) for k in by_metric)] for name in classes[:MAX_PER_CLASS_ROWS]]
    text = table(["class", "images", *(k.removesuffix("_acc") for k in by_metric)], rows)
    if len(classes) > MAX_PER_CLASS_ROWS:
        text += f"\n… and {len(classes) - MAX_PER_CLASS_ROWS} more classes (every class is in the model card)"
    return text


def job_summary(job: dict[str, Any]) -> str:
    spec, p = job.get("spec") or {}, job.get("progress") or {}
    model = f"{spec.get('method', '?')}: {spec.get('student', '?')} student"
    if spec.get("peer"):
        model += f", {spec['peer']} peer" if isinstance(spec["peer"], str) else ", peer"
    model += f", {spec.get('epochs', '?')} epochs"
    dataset = job["dataset"] + (f" ({job['dataset_id']})" if job.get("dataset_id") else "")
    progress = progress_text(job)
    if epoch := epoch_text(job):
        progress += f", {epoch}"
    if p.get("images_per_sec"):
        progress += f", {p['images_per_sec']:.0f} img/s"
    if job["status"] == "running" and p.get("eta_seconds") is not None:
        progress += f", ETA {format_duration(p['eta_seconds'])}"
    lines = [
        ("job", job["id"]),
        ("status", f"{job['status']} ({job['phase']})" if job.get("phase") and job["phase"] != job["status"] else job["status"]),
        ("preset", job.get("preset") or "-"),
        ("dataset", dataset),
        ("model", model),
        ("progress", progress),
        ("latest", metrics_text(job.get("latest_metrics"))),
        ("best", metrics_text(job.get("best_metrics"))),
        ("attempts", str(job.get("attempts", "-"))),
        ("created", timestamp(job.get("created_at"))),
        ("started", timestamp(job.get("started_at"))),
        ("finished", timestamp(job.get("finished_at"))),
    ]
    if job.get("cancel_requested") and job["status"] not in TERMINAL_STATUSES:
        lines.append(("cancel", "requested"))
    if job.get("error"):
        lines.append(("error", job["error"]))
    for warning in job.get("warnings") or []:
        advice = f" ({warning['advice']})" if warning.get("advice") else ""
        lines.append(("warning", f"{warning.get('model', '')}: {warning.get('message')}{advice}"))
    evaluation = job.get("evaluation") or {}
    for failure in evaluation.get("failures") or []:
        lines.append(("not run", f"{failure['attack']} on the {failure['model']}: {failure['error']}"))
    text = "\n".join(f"{k:<10}{v}" for k, v in lines)
    if job.get("result"):
        images = ", ".join(f"{n.removesuffix('_acc')} {count}" for n, count in (evaluation.get("images") or {}).items())
        sample = evaluation.get("sample") or {}
        if sample.get("seed") is not None:
            images += f" ({sample['method']} of the {sample['test_images']} test images, seed {sample['seed']})"
        text += "\n\ntest-set report (best epoch by validation PGD accuracy" + (f"; images per attack: {images}" if images else "") + "):\n"
        text += report_table(job["result"])
        if per_class := per_class_table(job):
            text += "\n\nstudent, per class:\n" + per_class
    return text


# --- spec assembly ---------------------------------------------------------------------------------


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` pairs into a nested dict; values are JSON where they parse, else strings. The same rules and
    messages as the engine's `python -m core.engine.cli train --set` (core.engine.cli.parse_overrides; a test
    compares them: this package may not import the service)."""
    result: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set {assignment!r}: expected KEY=VALUE, e.g. epochs=30 or peeraid.tau=3")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {assignment!r}: {part} was already set to a value")
            node = child
        node[leaf] = value
    return result


def read_spec_file(path: str) -> dict[str, Any]:
    try:
        spec = json.loads(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"--spec {path}: {err.strerror}") from None
    except ValueError as err:
        raise UsageError(f"--spec {path}: not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"--spec {path}: expected a JSON object of job-spec fields")
    return spec


# --- commands --------------------------------------------------------------------------------------


def cmd_datasets_upload(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(
            total=path.stat().st_size if path.is_file() else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"uploading {path.name}",
            file=sys.stderr,
            leave=False,
        )
    try:
        dataset = client.upload_dataset(
            path, name=args.name, resize=args.resize, on_progress=(lambda sent, _: bar.update(sent - bar.n)) if bar else None
        )
    except Conflict as err:
        taken = re.search(r"\((ds_\w+)\)", err.message)  # the dataset that has the name
        if taken is None:
            raise
        raise Hinted(err.message, f"--name NEW_NAME, or `peeraid datasets delete {taken.group(1)}`") from None
    finally:
        if bar is not None:
            bar.close()
    print(dataset["id"])
    shape = "×".join(map(str, dataset.get("input_shape") or [])) or "?"
    print(
        f"uploaded {path.name} as '{dataset['name']}': {dataset.get('format')}, {dataset.get('num_train')} train / "
        f"{dataset.get('num_test')} test, {len(dataset.get('classes') or [])} classes, {shape}, {format_bytes(dataset.get('size_bytes'))}",
        file=sys.stderr,
    )
    return 0


def cmd_datasets_list(client: Client, args: argparse.Namespace) -> int:
    rows = []
    for d in client.list_datasets():
        shape = "×".join(map(str, d["input_shape"])) if d.get("input_shape") else None
        kind = "built-in" if d.get("builtin") else d.get("format")
        size = format_bytes(d["size_bytes"]) if d.get("size_bytes") is not None else None
        rows.append(
            [
                d["id"],
                d["name"],
                kind,
                d.get("num_train"),
                d.get("num_test"),
                len(d["classes"]) if d.get("classes") else None,
                shape,
                size,
                timestamp(d.get("created_at")) if d.get("created_at") else None,
            ]
        )
    print(table(["ID", "NAME", "KIND", "TRAIN", "TEST", "CLASSES", "SHAPE", "SIZE", "CREATED"], rows))
    return 0


def cmd_datasets_show(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.get_dataset(args.id), indent=2))
    return 0


def cmd_datasets_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_dataset(args.id)
    print(f"deleted {args.id}")
    return 0


def cmd_jobs_submit(client: Client, args: argparse.Namespace) -> int:
    spec = read_spec_file(args.spec) if args.spec else {}
    spec = merge(spec, parse_assignments(args.set or []))
    if args.dry_run:
        return print_preflight(client.preflight_job(preset=args.preset, dataset=args.dataset, spec=spec))
    job = client.submit_job(preset=args.preset, dataset=args.dataset, spec=spec, idempotency_key=args.idempotency_key)
    print(job["id"], flush=True)
    s = job["spec"]
    print(
        f"{job['status']}: {s.get('method')} with a {s.get('student')} student on '{job['dataset']}', {s.get('epochs')} epochs",
        file=sys.stderr,
    )
    return watch(client, job["id"]) if args.watch else 0


def print_preflight(plan: dict[str, Any]) -> int:
    s, e = plan["spec"], plan["estimate"]
    print(
        f"{'admitted' if plan['admitted'] else 'would be refused'}: {s.get('method')} with a {s.get('student')} student on "
        f"'{plan['dataset']}', {s.get('epochs')} epochs, batch {s.get('batch_size')}"
    )
    hours = ", ".join(f"{device} {format_duration(h * 3600)}" for device, h in e["hours"].items())
    print(
        f"estimate: {hours} (limits checked on {plan['device']}); memory {format_bytes(e['memory_bytes'])} at this batch size; "
        f"{format_count(e['student_parameters'])} student parameters"
    )
    for warning in e["warnings"]:
        print(f"warning: {warning}")
    for refusal in plan["refusals"]:
        print(f"refused: {refusal['field']}: {refusal['message']}", file=sys.stderr)
    return 0 if plan["admitted"] else 1


def watch(client: Client, job_id: str) -> int:
    job = client.wait(job_id, progress=True)
    print(job_summary(job))
    return 0 if job["status"] == "succeeded" else 1


def cmd_jobs_list(client: Client, args: argparse.Namespace) -> int:
    page = client.list_jobs(status=args.status, limit=args.limit, offset=args.offset)
    rows = [[j["id"], j["status"], j["dataset"], j.get("preset"), progress_text(j), timestamp(j.get("created_at"))] for j in page["items"]]
    print(table(["ID", "STATUS", "DATASET", "PRESET", "PROGRESS", "CREATED"], rows))
    if page["total"] > len(page["items"]):
        print(f"({len(page['items'])} of {page['total']} jobs; --limit/--offset for more)", file=sys.stderr)
    return 0


def cmd_jobs_show(client: Client, args: argparse.Namespace) -> int:
    job = client.get_job(args.id)
    print(json.dumps(job, indent=2) if args.json else job_summary(job))
    return 0


def cmd_jobs_watch(client: Client, args: argparse.Namespace) -> int:
    return watch(client, args.id)


def cmd_jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel_job(args.id)
    if job["status"] in TERMINAL_STATUSES:
        print(f"{job['id']}: {job['status']}")
    else:
        print(f"{job['id']}: cancel requested; it stops within one training step ({describe_progress(job)})")
    return 0


def cmd_jobs_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_job(args.id)
    print(f"deleted {args.id}")
    return 0


def cmd_jobs_download(client: Client, args: argparse.Namespace) -> int:
    listing = client.list_artifacts(args.id)
    names = [a["name"] for a in listing] if args.artifact == "all" else [args.artifact]
    if not names:
        raise PeeraidError(None, f"job {args.id} has no artifacts yet")
    directory = Path(args.output)
    directory.mkdir(parents=True, exist_ok=True)
    by_name = {a["name"]: a for a in listing}
    for name in names:
        path = client.download_artifact(args.id, name, directory)
        size = by_name[name]["size_bytes"] if name in by_name else path.stat().st_size
        print(f"{path}  {format_bytes(size)}  sha256 verified")
    return 0


def cmd_jobs_curves(client: Client, args: argparse.Namespace) -> int:
    print(client.download_curves(args.id, args.output))
    return 0


def cmd_presets(client: Client, args: argparse.Namespace) -> int:
    print(table(["NAME", "DESCRIPTION"], [[p["name"], p["description"]] for p in client.list_presets()]))
    return 0


def cmd_architectures(client: Client, args: argparse.Namespace) -> int:
    rows = [
        [a["name"], a["family"], format_count(a["params_cifar10"]), a["min_input_size"], a["description"]]
        for a in client.list_architectures()
    ]
    print(table(["NAME", "FAMILY", "PARAMS", "MIN INPUT", "DESCRIPTION"], rows))
    return 0


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # the connection options are accepted before or after the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="service URL (default $PEERAID_URL, config file, http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (default $PEERAID_API_KEY, config file)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per request (default 30)")

    parser = argparse.ArgumentParser(
        prog="peeraid", description=__doc__, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="{datasets,jobs,presets,architectures}")

    def command(sub: argparse._SubParsersAction, name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func, parser=p)
        return p

    datasets = groups.add_parser("datasets", help="upload, list and delete datasets").add_subparsers(dest="command", required=True)
    p = command(datasets, "upload", cmd_datasets_upload, "upload a .npz, or a .zip/.tar/.tar.gz of class folders")
    p.add_argument("file")
    p.add_argument("--name", help="a name for it (default: the file name)")
    p.add_argument("--resize", metavar="WIDTHxHEIGHT", help="resize every image to this size (needed when their sizes differ), e.g. 32x32")
    command(datasets, "list", cmd_datasets_list, "built-in datasets and your uploads")
    command(datasets, "show", cmd_datasets_show, "one dataset, as JSON").add_argument("id")
    command(datasets, "delete", cmd_datasets_delete, "delete an uploaded dataset").add_argument("id")

    jobs = groups.add_parser("jobs", help="submit, follow, cancel and download jobs").add_subparsers(dest="command", required=True)
    p = command(jobs, "submit", cmd_jobs_submit, "submit a robustification job (prints its id)")
    p.add_argument("--preset", help="start from a preset (see `peeraid presets`)")
    p.add_argument("--dataset", help="a built-in dataset name or an uploaded dataset id")
    p.add_argument("--spec", metavar="FILE.json", help="job-spec fields from a JSON file (under --set)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a spec field, JSON where it parses: epochs=30, peeraid.tau=3")
    p.add_argument("--idempotency-key", help="reuse to make a retried submit return the same job (default: a fresh one)")
    p.add_argument("--watch", action="store_true", help="follow it until it finishes; exit 0 only if it succeeded")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check and estimate it without submitting: resolved spec, hours per device class, memory, refusals",
    )
    p = command(jobs, "list", cmd_jobs_list, "your jobs, newest first")
    p.add_argument("--status", choices=JOB_STATUSES)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p = command(jobs, "show", cmd_jobs_show, "status, progress, metrics, report and error of a job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the raw job as JSON")
    command(jobs, "watch", cmd_jobs_watch, "live progress until the job finishes; exit 0 only if it succeeded").add_argument("id")
    command(jobs, "cancel", cmd_jobs_cancel, "cancel a queued or running job").add_argument("id")
    command(jobs, "delete", cmd_jobs_delete, "delete a finished job and its files").add_argument("id")
    p = command(jobs, "download", cmd_jobs_download, "download artifacts, checking size and SHA-256")
    p.add_argument("id")
    p.add_argument(
        "--artifact",
        default="all",
        metavar="NAME",
        help=f"one artifact by name, e.g. {', '.join(ARTIFACT_NAMES)} (the job's own are listed by `jobs show --json`); "
        "default: all of them",
    )
    p.add_argument("-o", "--output", default=".", metavar="DIR", help="directory to write into (default: the current one)")
    p = command(jobs, "curves", cmd_jobs_curves, "download the training curves as a PNG")
    p.add_argument("id")
    p.add_argument("-o", "--output", metavar="FILE", help="default: <job id>-curves.png")

    command(groups, "presets", cmd_presets, "named job specs")
    command(groups, "architectures", cmd_architectures, "student and peer architectures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    client: Client | None = None
    try:
        client = Client(getattr(args, "url", None), getattr(args, "api_key", None), timeout=getattr(args, "timeout", 30.0))
        return args.func(client, args)
    except UsageError as err:
        args.parser.error(str(err))  # exits 2
    except ValidationError as err:
        for field, message in err.errors or [("", err.message)]:
            print(f"error: {field}: {message}" if field else f"error: {message}", file=sys.stderr)
    except AuthenticationError:
        if client is None or client.api_key is None:
            print(f"error: no API key configured: pass --api-key, set PEERAID_API_KEY, or put api_key in {config_path()}", file=sys.stderr)
        else:
            source = "--api-key" if client.api_key_source == "argument" else client.api_key_source
            print(
                f"error: the API key was refused ({key_hint(client.api_key)}, from {source}): it is mistyped or was revoked; "
                f"check --api-key, PEERAID_API_KEY or api_key in {config_path()}",
                file=sys.stderr,
            )
    except Hinted as err:
        print(f"error: {err}\nhint: {err.hint}", file=sys.stderr)
    except PeeraidError as err:
        print(f"error: {err}", file=sys.stderr)
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    finally:
        if client is not None:
            client.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
