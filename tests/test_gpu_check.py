"""`python -m bench.gpu_check` on CPU: the checks that need no GPU run at tiny sizes, the rest say why not."""

import json

import pytest
import torch

from bench import gpu_check
from core.engine.execution import Execution, StepRunner


def test_gpu_check_runs_on_cpu_and_writes_every_figure(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert gpu_check.main(["--device", "cpu", "--json", str(tmp_path / "out.json")]) == 0
    assert torch.get_num_threads() == threads  # the CPU run's single thread does not leak into the caller
    out = json.loads((tmp_path / "out.json").read_text())
    checks = out["checks"]
    assert set(checks) == {"graph_vs_eager_fp32", "graph_vs_eager_tf32", "training", "step_benchmark", "epoch_overhead"}
    assert out["skipped"] == ["graph_vs_eager_fp32", "graph_vs_eager_tf32"] and out["failed"] == []
    assert checks["graph_vs_eager_fp32"]["reason"] == "CUDA graphs need a GPU"
    runs = checks["training"]["runs"]
    assert set(runs) == {"fp32", "bf16"} and all(0 <= r["test_pgd_acc"] <= 1 for r in runs.values())
    assert runs["bf16"]["execution"]["precision"] == "bf16" and runs["fp32"]["execution"]["cuda_graph"] is False
    variants = checks["step_benchmark"]["architectures"]["small_cnn"]
    assert variants["reference"]["ratio_to_reference"] == 1 and all(v["images_per_sec"] > 0 for v in variants.values())
    assert variants["reference"]["peak_gib"] is None  # no GPU memory on a CPU: null, not NaN, in strict JSON
    assert checks["epoch_overhead"]["modes"]["eager"]["total_s"] > 0
    printed = capsys.readouterr().out
    assert "SKIPPED graph_vs_eager_fp32" in printed and "INFO    training" in printed and "0 failed" in printed


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: a second thread only waits at barriers on a shared CPU
    yield
    torch.set_num_threads(threads)


class FirstBatchRunner(StepRunner):
    """Trains on its first batch over and over: what a graph replaying a stale batch does."""

    def __call__(self, x, y):
        self.first = getattr(self, "first", (x, y))
        return super().__call__(*self.first)


def test_the_graph_comparison_measures_every_tensor_against_its_change_after_every_step(one_thread):
    s = gpu_check.sizes(gpu=False)
    cpu = torch.device("cpu")
    start, a, report = gpu_check.run_steps(Execution("fp32", False, False), "small_cnn", cpu, s)
    _, b, _ = gpu_check.run_steps(Execution("fp32", False, False), "small_cnn", cpu, s)
    _, c, _ = gpu_check.run_steps(Execution("bf16", False, False), "small_cnn", cpu, s)
    _, stale, _ = gpu_check.run_steps(Execution("fp32", False, False), "small_cnn", cpu, s, FirstBatchRunner)
    assert len(a) == s["compare_steps"] and any(k.startswith("peer.") and "running_var" in k for k in start)
    assert gpu_check.per_step(start, a, b) == [0] * len(a)  # the same path twice, the RNG re-seeded per step: identical
    assert 0 < max(gpu_check.per_step(start, a, c)) < 1  # bf16 differs, but follows the update
    stale_differences = gpu_check.per_step(start, a, stale)
    assert stale_differences[0] == 0 and max(stale_differences) > gpu_check.GRAPH_TOLERANCE["fp32"]  # caught
    assert report["cuda_graph"] is False and report["precision"] == "fp32"
