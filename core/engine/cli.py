"""Run a robustification job locally: `python -m core.engine.cli train --preset digits-demo`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from peeraid_models import list_models
from tqdm import tqdm

from .builtin_datasets import BUILTIN_DATASETS
from .callbacks import EpochRecord, EvaluationProgress, Stage, StepProgress, TrainingCallbacks
from .errors import DatasetError, SpecError
from .pipeline import JobResult, run_job
from .report import AUTOATTACK_KEY, metric_label
from .sources import load_splits
from .spec import PRESETS, build_spec, merge_overrides


def read_spec(value: str) -> dict[str, Any]:
    """--spec: a JSON object inline (it starts with "{"), or the path of a file holding one."""
    if value.lstrip().startswith("{"):
        text, source = value, "--spec"
    else:
        try:
            text, source = Path(value).read_text(), value
        except OSError as err:
            raise SpecError([{"field": "--spec", "message": f"cannot read {value}: {err.strerror}"}]) from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError([{"field": "--spec", "message": f"{source} is not valid JSON: {err}"}]) from None
    if not isinstance(spec, dict):
        raise SpecError([{"field": "--spec", "message": f"{source} must hold a JSON object of job-spec fields"}])
    return spec


def job_overrides(spec: str | None, assignments: list[str], dataset: str | None) -> dict[str, Any]:
    """--spec, then each --set, then --dataset, merged deeply over one another as the API merges a spec over its preset."""
    overrides = merge_overrides(read_spec(spec) if spec else {}, parse_overrides(assignments))
    return merge_overrides(overrides, {"dataset": dataset}) if dataset else overrides


class UsageError(ValueError):
    """A command-line argument that does not parse; main() reports it as argparse does its own (exit status 2)."""


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """`a.b=value` pairs into a nested dict; values are JSON where they parse, else strings. The same rules and
    messages as the client's `peeraid jobs submit --set` (peeraid_client.cli.parse_assignments; a test compares them)."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set {assignment!r}: expected KEY=VALUE, e.g. epochs=30 or peeraid.tau=3")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {assignment!r}: {part} was already set to a value")
            node = child
        node[leaf] = value
    return overrides


class ProgressBar(TrainingCallbacks):
    def __init__(self, file=sys.stderr):
        self.bar: tqdm | None = None
        self.file = file

    def on_step(self, p: StepProgress) -> None:
        if self.bar is None or self.bar.desc != f"epoch {p.epoch}/{p.epochs}":
            self._close()
            self.bar = tqdm(
                total=p.steps_per_epoch,
                desc=f"epoch {p.epoch}/{p.epochs}",
                file=self.file,
                leave=False,
                bar_format="{desc} {bar} {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]",
            )
        self.bar.update(p.step - self.bar.n)
        self.bar.set_postfix({"img/s": f"{p.images_per_sec:.0f}", **{k: f"{v:.3f}" for k, v in p.losses.items() if k.startswith("loss")}})

    def on_epoch(self, r: EpochRecord) -> None:
        self._close()
        line = f"epoch {r.epoch}: lr {r.lr:.4g}  student clean {r.student['clean_acc']:.1%} pgd {r.student['pgd_acc']:.1%}"
        if r.swa_student:
            line += f"  swa clean {r.swa_student['clean_acc']:.1%} pgd {r.swa_student['pgd_acc']:.1%}"
        print(f"{line}  ({r.images_per_sec:.0f} img/s)", file=self.file)

    def on_evaluation(self, p: EvaluationProgress) -> None:
        desc = f"{p.model}: {p.attack}"
        if self.bar is None or self.bar.desc != desc:
            self._close()
            self.bar = tqdm(
                total=p.batches,
                desc=desc,
                file=self.file,
                leave=False,
                bar_format="{desc} {bar} {n_fmt}/{total_fmt} batches [{elapsed}<{remaining}{postfix}]",
            )
        self.bar.update(p.batch - self.bar.n)
        if p.accuracy_so_far is not None:
            self.bar.set_postfix({"robust accuracy so far": f"{p.accuracy_so_far:.1%}"})

    def on_stage(self, stage: Stage, detail: str = "") -> None:
        self._close()
        print(detail or stage.value, file=self.file)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_report(result: JobResult) -> str:
    """The test metrics per model, one column per planned attack ("—" where an attack failed), then what failed."""
    keys = list(result.evaluation["images"])
    lines = [f"{'model':<14}{'epoch':>6}" + "".join(f"{metric_label(k):>12}" for k in keys)]
    for model, m in result.report.items():
        cells = "".join(f"{m['test'][k]:>12.2%}" if k in m["test"] else f"{'—':>12}" for k in keys)
        lines.append(f"{model:<14}{m['best_epoch']:>6}{cells}")
    same_images = {model: m["test_on_autoattack_images"] for model, m in result.report.items() if m.get("test_on_autoattack_images")}
    if same_images:
        lines.append(f"on the {result.evaluation['images'][AUTOATTACK_KEY]} images AutoAttack ran on:")
        for model, figures in same_images.items():
            lines.append(f"{model:<14}{'':>6}" + "".join(f"{figures[k]:>12.2%}" if k in figures else f"{'—':>12}" for k in keys))
    lines.append("test images per attack: " + ", ".join(f"{metric_label(k)} {n}" for k, n in result.evaluation["images"].items()))
    sample = result.evaluation.get("sample") or {}
    if sample.get("seed") is not None:
        lines.append(f"({sample['method']} of the {sample['test_images']} test images, seed {sample['seed']})")
    if "autoattack" in result.evaluation:
        lines.append(f"AutoAttack: {result.evaluation['autoattack']['description']}")
    lines += [f"not evaluated: {f['attack']} on {f['model']}: {f['error']}" for f in result.evaluation["failures"]]
    lines += [f"warning: {w['message']}" for w in result.warnings]
    lines += [f"what to try: {advice}" for advice in dict.fromkeys(w["advice"] for w in result.warnings)]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = build_spec(args.preset, job_overrides(args.spec, args.set or [], args.dataset))
    splits = load_splits(
        spec.dataset, data_root=Path(args.data_root), val_fraction=spec.val_fraction, seed=spec.seed, selection=spec.selection
    )
    print(
        f"{spec.method}: {spec.student} student"
        + (f", {spec.peer_architecture} peer" if spec.peer_architecture else "")
        + f" on {splits.name} ({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
        f"{'×'.join(map(str, splits.input_shape))}), ε = {spec.epsilon:.4f}, {spec.epochs} epochs; workdir {args.workdir}",
        file=sys.stderr,
    )
    result = run_job(spec, splits, Path(args.workdir), device=args.device, callbacks=ProgressBar(), progress_interval=0.5)
    print(format_report(result))
    print(f"weights and model card (accuracy per class: model_card.md) in {Path(args.workdir) / 'artifacts'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "presets":
        for name, (description, _) in PRESETS.items():
            print(f"{name:<24}{description}")
    elif args.what == "architectures":
        for info in list_models():
            print(f"{info.name:<16}{info.description}")
    else:
        for name, description in BUILTIN_DATASETS.items():
            print(f"{name:<16}{description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peeraid-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train, evaluate and export a robust student")
    train.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    train.add_argument("--spec", help='job-spec fields over the preset: inline JSON (\'{"peeraid": {"gamma2": 0.7}}\') or a JSON file')
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="a field over --spec, e.g. epochs=5 or peeraid.tau=3")
    train.add_argument("--dataset", help="built-in name or a dataset file (.zip, .tar.gz, .npz)")
    train.add_argument("--workdir", default="runs/local", help="checkpoints and artifacts; an existing checkpoint is resumed")
    train.add_argument("--data-root", default="data", help="where CIFAR/TinyImageNet live or are downloaded to")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    train.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch (default: one per core); on a machine "
        "busy with other work, 1 is often several times faster than more",
    )
    train.set_defaults(func=cmd_train, parser=train)
    listing = sub.add_parser("list", help="list presets, architectures or built-in datasets")
    listing.add_argument("what", choices=["presets", "architectures", "datasets"])
    listing.set_defaults(func=cmd_list, parser=listing)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        command: argparse.ArgumentParser = args.parser
        command.error(str(err))  # exits 2
    except (SpecError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
