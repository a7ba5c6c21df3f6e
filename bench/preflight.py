"""How good is the preflight's estimate: real jobs timed against it, and the rates they imply.

    python -m bench.preflight                  # digits-demo, small-data on the digits, ResNet-18 at 32×32, textures
    python -m bench.preflight --cases digits-demo --threads 2

For each case it runs the whole job through the engine (`run_job`, as the worker does), times the
training (up to the export) and the final evaluation separately, and prints them beside the
estimate's hours on this device class, with the arithmetic per second each part reached; the rates
in `core/engine/preflight.py` DEVICE_RATES come from this command. Engine only (torch)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import user_data
from core.engine.callbacks import Stage, TrainingCallbacks
from core.engine.datasets import DatasetSplits, ImageDataset, fingerprint, split_validation
from core.engine.estimates import DEVICE_RATES, DataShape
from core.engine.pipeline import run_job
from core.engine.preflight import device_class, preflight
from core.engine.sources import load_digits, load_splits
from core.engine.spec import JobSpec, build_spec


@dataclass(frozen=True)
class Case:
    preset: str
    overrides: dict
    rgb_size: int | None = None  # the digits upscaled to this size and repeated to 3 channels
    train_images: int | None = None  # the first this many training images only
    user_textures: bool = False  # bench.user_data's zip of class folders instead, loaded as the worker loads an upload


CASES = {
    "digits-demo": Case("digits-demo", {}),
    "small-data": Case("small-data", {"dataset": "digits", "evaluation": {"autoattack_n_examples": 50}}),
    "resnet18": Case(
        "small-data",
        {"student": "resnet18", "peer": "resnet18", "epochs": 1, "evaluation": {"n_examples": 64, "autoattack_n_examples": 8}},
        rgb_size=32,
        train_images=192,
    ),
    # as a new user's job: 4 classes of photo-like textures (32×32 RGB, 600 train / 200 test), AutoAttack on 100
    "textures": Case("small-data", {"epochs": 10, "evaluation": {"autoattack_n_examples": 100}}, user_textures=True),
}


def splits_for(case: Case, spec: JobSpec) -> DatasetSplits:
    if case.user_textures:
        with tempfile.TemporaryDirectory() as folder:
            archive = user_data.write_zip(Path(folder) / "textures.zip")
            return load_splits(str(archive), val_fraction=spec.val_fraction, seed=spec.seed, selection=spec.selection)
    if case.rgb_size is None:
        return load_splits(spec.dataset, val_fraction=spec.val_fraction, seed=spec.seed, selection=spec.selection)
    train, test = load_digits(size=case.rgb_size)
    rgb = lambda d: ImageDataset(d.images.repeat(1, 3, 1, 1), d.labels, d.classes)
    train, test = rgb(train), rgb(test)
    if case.train_images is not None:
        train = train.subset(torch.arange(case.train_images))
    train, val = split_validation(train, spec.val_fraction, spec.seed)
    return DatasetSplits(f"digits-rgb{case.rgb_size}", train, val, test, fingerprint(train, val, test))


class StageClock(TrainingCallbacks):
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.at: dict[Stage, float] = {}

    def on_stage(self, stage: Stage, detail: str = "") -> None:
        self.at.setdefault(stage, time.monotonic())


def measure(name: str, case: Case, device: str) -> dict:
    spec = build_spec(case.preset, case.overrides)
    splits = splits_for(case, spec)
    c, h, w = splits.input_shape
    full_train = len(splits.train) + (len(splits.val) if spec.selection == "validation" else 0)
    shape = DataShape(c, h, w, len(splits.classes), full_train, len(splits.test))
    estimate = preflight(spec, shape)
    clock = StageClock()
    with tempfile.TemporaryDirectory() as workdir:
        run_job(spec, splits, Path(workdir), device=device, callbacks=clock, progress_interval=3600)
    end = time.monotonic()
    training = clock.at[Stage.EXPORTING] - clock.started
    evaluation = end - clock.at[Stage.EVALUATING]
    device_kind = device_class(device)
    rate = DEVICE_RATES[device_kind]
    return {
        "case": name,
        "student": spec.student,
        "input": f"{c}×{h}×{w}",
        "epochs": spec.epochs,
        "training_s": training,
        "training_estimate_s": estimate.training_flops / rate.flops_per_second(spec.student),
        "training_rate": estimate.training_flops / training,
        "evaluation_s": evaluation,
        "evaluation_estimate_s": estimate.evaluation_hours[device_kind] * 3600,
        "evaluation_rate": estimate.evaluation_flops / evaluation,
        "total_s": end - clock.started,
        "estimate_s": estimate.hours[device_kind] * 3600,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {dt.date.today()} {platform.node()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" load {load:.1f}"
    )
    print(f"{'case':<12} {'student':<10} {'input':<8} {'part':<11} {'measured':>9} {'estimate':>9} {'ratio':>6} {'GFLOP/s':>8}")
    for name in args.cases.split(","):
        r = measure(name, CASES[name], args.device)
        for part in ("training", "evaluation"):
            measured, estimated = r[f"{part}_s"], r[f"{part}_estimate_s"]
            print(
                f"{name:<12} {r['student']:<10} {r['input']:<8} {part:<11} {measured:8.1f}s {estimated:8.1f}s"
                f" {estimated / measured:6.2f} {r[f'{part}_rate'] / 1e9:8.2f}"
            )
        print(f"{name:<12} {'':<10} {'':<8} {'job':<11} {r['total_s']:8.1f}s {r['estimate_s']:8.1f}s {r['estimate_s'] / r['total_s']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
