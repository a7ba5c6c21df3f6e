"""Training-step throughput of PeerAiD, reference-equivalent eager against the fast execution paths.

    python -m bench.train_step                                  # GPU: ResNet-18 and WRN-34-10, CIFAR shape
    python -m bench.train_step --archs resnet18 --batch 512
    python -m bench.train_step --device cpu --archs small_cnn --batch 32 --steps 3 --epoch-images 512   # smoke

For each architecture it prints images/s, the ratio to the reference step and peak GPU memory for:
  reference   the authors' step: eager, fp32 weights with TF32 convolutions (PyTorch's default), NCHW,
              two student forwards on x' (as their loop does), data already on the device
  eager       the same with one student forward on x'
  tf32-graph  one CUDA graph per step, TF32, channels_last
  bf16-graph  one CUDA graph per step, bf16 autocast, channels_last
then one end-to-end epoch through the Trainer (data loading, augmentation on the device, the step,
per-epoch validation) on a synthetic CIFAR-shaped dataset, with the share spent outside the step.
Uses the engine only (torch; no service packages), so it runs on a bare GPU machine."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from dataclasses import replace

import torch
from peeraid_models import create_model

from core.engine.datasets import DatasetSplits, ImageDataset, fingerprint
from core.engine.execution import Execution, StepRunner
from core.engine.methods import AttackSettings, Networks, PeerAiD
from core.engine.spec import PAPER_WEIGHTS

VARIANTS = {
    "reference": (Execution("tf32", False, False), 2),
    "eager": (Execution("tf32", False, False), 1),
    "tf32-graph": (Execution("tf32", True, True), 1),
    "bf16-graph": (Execution("bf16", True, True), 1),
}


def reference_backends(execution: Execution, device: torch.device) -> None:
    if device.type != "cuda":
        return
    execution.configure_backends()
    if execution.precision == "tf32" and not execution.cuda_graph:
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's defaults, as the authors ran: TF32 convs, fp32 matmuls
    torch.backends.cudnn.benchmark = True


def measure_step(arch: str, variant: str, device: torch.device, batch: int, classes: int, size: int, steps: int, warmup: int) -> dict:
    execution, forwards = VARIANTS[variant]
    if device.type != "cuda":
        execution = replace(execution, precision="fp32" if execution.precision == "tf32" else execution.precision, cuda_graph=False)
    reference_backends(execution, device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if execution.channels_last else torch.contiguous_format
    student = create_model(arch, num_classes=classes).to(device, memory_format=memory_format)
    peer = create_model(arch, num_classes=classes).to(device, memory_format=memory_format)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    nets = Networks(student, sgd(student), peer, sgd(peer))
    method = PeerAiD(AttackSettings(8 / 255, 2 / 255, 10), PAPER_WEIGHTS["cifar100"], student_adv_forwards=forwards)
    runner = StepRunner(method, nets, execution, device)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, classes, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        runner(x, y)
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        losses = runner(x, y)
    sync(device)
    seconds = time.perf_counter() - started
    assert all(torch.isfinite(v).all() for v in losses.values()), f"{variant}: non-finite loss"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_sec": steps * batch / seconds, "peak_gib": peak}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_cifar(n_train: int, classes: int, n_val: int) -> DatasetSplits:
    g = torch.Generator().manual_seed(0)
    make = lambda n: ImageDataset(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, classes, (n,), generator=g),
        [str(c) for c in range(classes)],
    )
    train, val, test = make(n_train), make(n_val), make(16)
    return DatasetSplits("synthetic-cifar", train, val, test, fingerprint(train, val, test))


def measure_epoch(arch: str, device: torch.device, batch: int, classes: int, n_train: int, n_val: int, precision: str, graph: str) -> dict:
    from core.engine.spec import build_spec
    from core.engine.trainer import Trainer

    spec = build_spec(
        "cifar100-resnet18",
        {
            "student": arch,
            "peer": arch,
            "epochs": 2,
            "lr_decay_epochs": [1],
            "batch_size": batch,
            "swa": False,
            "precision": precision,
            "cuda_graph": graph,
            "selection": "validation",
            "student_adv_forwards": 1,
        },
    )
    splits = synthetic_cifar(n_train, classes, n_val)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(spec, splits, workdir=workdir, device=device, eval_batch_size=1024)
        trainer.run_epoch(0)  # warm-up: cudnn autotuning, graph capture
        sync(device)
        started = time.perf_counter()
        record = trainer.run_epoch(1)
        sync(device)
        total = time.perf_counter() - started
    return {"total_s": total, "train_s": record.train_seconds, "eval_s": record.eval_seconds, "images_per_sec": record.images_per_sec}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default="resnet18,wrn34_10")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--epoch-images", type=int, default=50_000, help="training images of the end-to-end epoch (0: skip it)")
    parser.add_argument("--epoch-val-images", type=int, default=2_000, help="validation images evaluated (clean + PGD-10) each epoch")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"# {dt.date.today()}  {name}  torch {torch.__version__}  batch {args.batch}, {args.classes} classes, "
        f"{args.size}×{args.size}, PeerAiD K=10 (student and peer the same architecture)"
    )
    for arch in args.archs.split(","):
        results = {}
        for variant in args.variants.split(","):
            results[variant] = measure_step(arch, variant, device, args.batch, args.classes, args.size, args.steps, args.warmup)
        base = results.get("reference", next(iter(results.values())))["images_per_sec"]
        print(f"\n{arch}\n{'variant':<12}{'images/s':>10}{'× ref':>8}{'peak GiB':>10}")
        for variant, r in results.items():
            print(f"{variant:<12}{r['images_per_sec']:>10.0f}{r['images_per_sec'] / base:>8.2f}{r['peak_gib']:>10.2f}")
        if args.epoch_images:
            modes = (("tf32", "on", "tf32-graph"), ("bf16", "on", "bf16-graph")) if device.type == "cuda" else (("fp32", "off", "eager"),)
            for precision, graph, variant in modes:
                e = measure_epoch(arch, device, args.batch, args.classes, args.epoch_images, args.epoch_val_images, precision, graph)
                line = (
                    f"epoch {precision}, graph {graph}: {args.epoch_images} images in {e['total_s']:.1f}s = "
                    f"training {e['train_s']:.1f}s (incl. data loading) + validation {e['eval_s']:.1f}s"
                )
                if variant in results:
                    steps_only = args.epoch_images / results[variant]["images_per_sec"]
                    line += (
                        f"; the step alone would take {steps_only:.1f}s, so data loading and validation "
                        f"add {(e['total_s'] - steps_only) / steps_only:.1%}"
                    )
                print(line)


if __name__ == "__main__":
    main()
